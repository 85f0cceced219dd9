"""The Based sliding-window mixer: softmax attention over the last `window` tokens, with RoPE."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from based.nn._validate import check_cache_batch, check_cache_type, check_hidden_states, parameter_placement
from based.nn.norm import RMSNorm
from based.nn.projection import project
from based.nn.rotary import rotated_qkv
from based.ops import WindowCache, sliding_window_attention, sliding_window_attention_step, window_cache_read
from based.ops import window_cache_write


class SlidingWindowCache(NamedTuple):
    """Decode state of one sliding-window layer.

    window:   ring buffer of the last `window` keys (after RoPE) and values.
    position: 0-dim int64 tensor on the layer's device, the absolute position of the next token. It
              lives on the device and is advanced in place, so a captured decode step replays correctly.
    advance:  whether the layer advances `position` after each call; False when a model shares one position
              among its layers and advances it once per step (`CausalLM.new_cache`).
    """

    window: WindowCache
    position: torch.Tensor
    advance: bool = True


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention where each token sees itself and the `window - 1` tokens before it.

    Multi-head, head dim `d_model // num_heads`, rotary embeddings on the full head dim (base 10000,
    non-interleaved), softmax scale `1/sqrt(head_dim)`, no biases. Parameters: `Wqkv` `[3*d_model,
    d_model]` (rows: q | k | v) and `out_proj` `[d_model, d_model]`, the released names. The released
    configs' flash-attn `window_size` w is `window = w // 2 + 1` here (129 for w = 256).

    Decoding: `layer.new_cache(batch_size)` holds `window` positions whatever the sequence length.
    """

    def __init__(self, d_model: int, *, num_heads: int = 16, window: int = 129, rotary_base: float = 10000.0,
                 device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.d_model, self.num_heads, self.window, self.rotary_base = d_model, num_heads, window, rotary_base
        self.head_dim = d_model // num_heads
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def new_cache(self, batch_size: int, max_seqlen: int | None = None, *, device=None,
                  dtype=None) -> SlidingWindowCache:
        """An empty cache of `window` positions (in the layer's dtype); `max_seqlen` does not change its size."""
        device, dtype = parameter_placement(self, device, dtype)
        ring = WindowCache.zeros(batch_size, self.window, self.num_heads, self.head_dim, device=device, dtype=dtype)
        return SlidingWindowCache(ring, torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor, cache: SlidingWindowCache | None = None, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, d_model]` -> `[B, T, d_model]`; with `cache`, continue from it and advance it.
        With `norm`, the layer sees `norm(x)`; with `residual` (x's leading dims, the fp32 stream), it returns
        `residual +` its output, in the residual's dtype (both fused into its projections' kernels when
        decoding one token on a GPU)."""
        check_hidden_states(x, self.d_model)
        B, T, _ = x.shape
        if cache is not None:
            check_cache_type(cache, SlidingWindowCache, "SlidingWindowAttention")
            check_cache_batch(cache.window.k.shape[0], x)
        start = None if cache is None else cache.position
        q, k, v = rotated_qkv(project(self.Wqkv, x, norm=norm), self.num_heads, start, self.rotary_base)

        if cache is None:
            o = sliding_window_attention(q, k, v, window=self.window)
        elif T == 1:
            # The decode step: reads the position on the device only, so it can be graph-captured.
            o = sliding_window_attention_step(q[:, 0], k[:, 0], v[:, 0], cache.window, cache.position)[:, None]
        else:
            # A prompt chunk: attend over the cached tail of the window plus the chunk itself.
            # The tail's length depends on the position, so it is read on the host here.
            start = int(cache.position)
            past_k, past_v = window_cache_read(cache.window, start)
            keys, values = torch.cat([past_k.to(k.dtype), k], 1), torch.cat([past_v.to(v.dtype), v], 1)
            o = sliding_window_attention(q, keys, values, window=self.window)
            window_cache_write(cache.window, k, v, start)
        if cache is not None and cache.advance:
            cache.position.add_(T)
        return project(self.out_proj, o.reshape(B, T, self.d_model), residual=residual)
