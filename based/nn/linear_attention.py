"""The Based linear-attention mixer: Taylor-feature-map linear attention over projected heads."""
from __future__ import annotations

import torch
from torch import nn

from based.nn._validate import check_cache_batch, check_cache_type, check_hidden_states, parameter_placement
from based.nn.norm import RMSNorm
from based.nn.projection import project, project_stacked
from based.ops import LinearAttentionState, linear_attention, linear_attention_step
from based.ops.linear_attention.state import accumulation_dtype


class LinearAttention(nn.Module):
    """Causal Taylor linear attention with `num_heads` heads.

    q and k are projected to `feature_dim` per head (16 in the released models), v to
    `head_dim = d_model // num_heads`. No biases. Parameters: `proj_q`, `proj_k` `[feature_dim * num_heads,
    d_model]`, `proj_v` `[d_model, d_model]`, `out_proj` `[d_model, d_model]`, the released names.

    `eps` defaults to the released models' 1e-12: the denominator is a sum of Taylor scores, each
    >= 1/2, so it only matters for exactly-zero inputs.

    A mixer in the sense of `based.nn.mixer`. Decoding: `cache = layer.new_cache(batch_size)` is a
    `LinearAttentionState` (fp32, O(1) in the sequence length); `layer(x, cache)` continues from it and
    updates it in place.
    """

    def __init__(self, d_model: int, *, num_heads: int = 16, feature_dim: int = 16, eps: float = 1e-12,
                 device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.d_model, self.num_heads, self.feature_dim, self.eps = d_model, num_heads, feature_dim, eps
        self.head_dim = d_model // num_heads
        placement = dict(bias=False, device=device, dtype=dtype)
        self.proj_q = nn.Linear(d_model, feature_dim * num_heads, **placement)
        self.proj_k = nn.Linear(d_model, feature_dim * num_heads, **placement)
        self.proj_v = nn.Linear(d_model, num_heads * self.head_dim, **placement)
        self.out_proj = nn.Linear(num_heads * self.head_dim, d_model, **placement)

    def new_cache(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None,
                  position: torch.Tensor | None = None) -> LinearAttentionState:
        """An empty recurrent state; its size does not depend on `max_seqlen` (nor does it need `position`)."""
        device, dtype = parameter_placement(self, device, dtype)
        return LinearAttentionState.zeros(batch_size, self.num_heads, self.feature_dim, self.head_dim,
                                          device=device, dtype=accumulation_dtype(dtype))

    def forward(self, x: torch.Tensor, cache: LinearAttentionState | None = None, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, d_model]` -> `[B, T, d_model]`; with `cache`, continue from it and advance it. `norm` and
        `residual`: see `based.nn.mixer`."""
        check_hidden_states(x, self.d_model)
        B, T, _ = x.shape
        q, k, v = project_stacked([self.proj_q, self.proj_k, self.proj_v], x, norm=norm)
        q = q.view(B, T, self.num_heads, self.feature_dim)
        k = k.view(B, T, self.num_heads, self.feature_dim)
        v = v.view(B, T, self.num_heads, self.head_dim)
        if cache is None:
            o = linear_attention(q, k, v, eps=self.eps)
        else:
            check_cache_type(cache, LinearAttentionState, "LinearAttention")
            check_cache_batch(cache.kv.shape[0], x)
            if T == 1:
                o = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache, eps=self.eps)[:, None]
            else:
                o, state = linear_attention(q, k, v, eps=self.eps, initial_state=cache, return_state=True)
                cache.kv.copy_(state.kv)
                cache.ksum.copy_(state.ksum)
        return project(self.out_proj, o.reshape(B, T, self.num_heads * self.head_dim), residual=residual)
