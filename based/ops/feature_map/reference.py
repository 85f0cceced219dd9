"""The Taylor feature map in plain PyTorch.

phi(x) = [1, x / d**0.25, second-order terms] with the second-order part kept once per pair (i <= j,
row-major upper triangle): x_i*x_i / (sqrt(2)*sqrt(d)) on the diagonal, x_i*x_j / sqrt(d) off it. Then
<phi(q), phi(k)> = 1 + s + s*s/2 with s = q.k / sqrt(d), the same dot products as the released models'
273-feature map with 44% fewer features (153 for d = 16).
"""
from __future__ import annotations

import math

import torch


def feature_dim_of(head_dim: int) -> int:
    """Number of Taylor features E for input dim d: 1 + d + d*(d+1)/2."""
    return 1 + head_dim + head_dim * (head_dim + 1) // 2


def second_order_index(d: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row/column indices of the kept pairs (i <= j) and each pair's scale."""
    rows, cols = torch.triu_indices(d, d, device=device)
    diagonal = torch.full(rows.shape, 1.0 / math.sqrt(2 * d), device=device, dtype=dtype)
    scale = torch.where(rows == cols, diagonal, 1.0 / math.sqrt(d))
    return rows, cols, scale


def taylor_feature_map_torch(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    rows, cols, scale = second_order_index(d, x.device, x.dtype)
    ones = torch.ones_like(x[..., :1])
    first = x * d**-0.25
    second = x[..., rows] * x[..., cols] * scale
    return torch.cat([ones, first, second], dim=-1)
