"""The fused linear op in plain PyTorch: cuBLAS matmul, then the gate and the residual add as separate ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_torch(x, weight, bias, residual, gated: bool):
    """`y = x @ weight.T + bias`; gated: `value * silu(gate)` with `value, gate = y.chunk(2)`; then
    `residual + y` in the residual's dtype when a residual is given."""
    y = F.linear(x, weight, bias)
    if gated:
        value, gate = y.chunk(2, dim=-1)
        y = value * F.silu(gate)
    if residual is None:
        return y
    return residual + y.to(torch.promote_types(residual.dtype, y.dtype))
