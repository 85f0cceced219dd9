"""The recurrent state of Taylor linear attention."""
from __future__ import annotations

from typing import NamedTuple

import torch

from based.ops.feature_map.reference import feature_dim_of


class LinearAttentionState(NamedTuple):
    """Running sums over the keys seen so far.

    kv:   `[B, H, E, dv]`, `sum_j phi(k_j) outer v_j`
    ksum: `[B, H, E]`,     `sum_j phi(k_j)`

    Both are float32 (float64 when the op ran on float64 inputs), whatever the input dtype.
    `E = 1 + d + d*(d+1)/2` for feature dim `d`.
    """

    kv: torch.Tensor
    ksum: torch.Tensor

    @classmethod
    def zeros(cls, batch_size: int, num_heads: int, feature_dim: int, head_dim: int, *, device=None,
              dtype: torch.dtype = torch.float32) -> "LinearAttentionState":
        """An empty state for `feature_dim` inputs (d, not E) and value dim `head_dim`."""
        n_features = feature_dim_of(feature_dim)
        return cls(
            kv=torch.zeros(batch_size, num_heads, n_features, head_dim, device=device, dtype=dtype),
            ksum=torch.zeros(batch_size, num_heads, n_features, device=device, dtype=dtype),
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs keep fp64 (the test references run there)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
