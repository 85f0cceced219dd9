"""`RotaryAttention`: the base of the softmax-attention mixers (Based's sliding window, the Transformer's
causal self-attention). Everything but the attention itself lives here once: the fused `Wqkv` and `out_proj`
projections, rotary q and k, the cache checks and the position the cache keeps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from based.nn._validate import check_cache_batch, check_cache_type, check_hidden_states, parameter_placement
from based.nn.norm import RMSNorm
from based.nn.projection import project
from based.nn.rotary import rotated_qkv


class RotaryAttention(nn.Module):
    """Multi-head attention with RoPE on the full head dim (non-interleaved), softmax scale `1/sqrt(head_dim)`,
    no biases. Parameters: `Wqkv` `[3*d_model, d_model]` (rows: q | k | v) and `out_proj` `[d_model, d_model]`,
    the released names. A mixer in the sense of `based.nn.mixer`.

    `rotary_base=None` leaves q and k unrotated: attention without positions, which then come only from the
    layers around it (the Zoology / BASED papers' recall models, whose convolutions supply them).

    A subclass sets `cache_type` (a NamedTuple whose last two fields are `position`, the 0-dim int64 device
    tensor holding the absolute position of the next token, and `advance`, whether the layer advances it) and
    implements `cache_tensors` (the rest of the cache's fields), `attend` (the parallel attention) and
    `attend_cached` (attention over the cache, which it updates with the new keys and values).
    """

    cache_type: type[NamedTuple]

    def __init__(self, d_model: int, *, num_heads: int, rotary_base: float | None = 10000.0, device=None,
                 dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        if rotary_base is not None and (isinstance(rotary_base, bool) or not isinstance(rotary_base, (int, float))
                                        or not rotary_base > 1):
            raise ValueError(f"rotary_base must be a number > 1 or None, got {rotary_base!r}")
        self.d_model, self.num_heads, self.rotary_base = d_model, num_heads, rotary_base
        self.head_dim = d_model // num_heads
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def cache_tensors(self, batch_size: int, max_seqlen: int | None, device, dtype) -> tuple:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q, k, v `[B, T, H, D]` (q and k rotated) -> `[B, T, H, D]`."""
        raise NotImplementedError

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any) -> torch.Tensor:
        """The same for T new tokens at `cache.position ..`, attending also over the cached ones; writes k, v
        into the cache (the position is advanced by `forward`)."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None,
                  position: torch.Tensor | None = None):
        """An empty cache (in the layer's dtype). With `position` (see `based.nn.mixer`) the cache reads that
        tensor and leaves advancing it to its owner; without, it keeps and advances its own."""
        device, dtype = parameter_placement(self, device, dtype)
        own = position is None
        if own:
            position = torch.zeros((), dtype=torch.int64, device=device)
        return self.cache_type(*self.cache_tensors(batch_size, max_seqlen, device, dtype), position, own)

    def forward(self, x: torch.Tensor, cache=None, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, d_model]` -> `[B, T, d_model]`; with `cache`, continue from it and advance it. `norm` and
        `residual`: see `based.nn.mixer`."""
        check_hidden_states(x, self.d_model)
        B, T, _ = x.shape
        if cache is not None:
            check_cache_type(cache, self.cache_type, type(self).__name__)
            check_cache_batch(cache.batch_size, x)
        start = None if cache is None else cache.position
        q, k, v = rotated_qkv(project(self.Wqkv, x, norm=norm), self.num_heads, start, self.rotary_base)
        if cache is None:
            o = self.attend(q, k, v)
        else:
            o = self.attend_cached(q, k, v, cache)
            if cache.advance:
                cache.position.add_(T)
        return project(self.out_proj, o.reshape(B, T, self.d_model), residual=residual)
