"""The fused linear op in plain PyTorch: RMSNorm, cuBLAS matmul, then the gate and the residual add as separate ops.
A reference calls only references, so `backend="torch"` never launches a Triton or CUDA kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from based.ops.rms_norm.reference import rms_norm_torch


def linear_torch(x, weight, bias, residual, gated: bool, norm_weight=None, norm_eps: float = 1e-5):
    """`y = x @ weight.T + bias`, x first replaced by `rms_norm(x, norm_weight, norm_eps)` when a norm weight is
    given; gated: `value * silu(gate)` with `value, gate = y.chunk(2)`; then `residual + y` in the residual's
    dtype when a residual is given."""
    if norm_weight is not None:
        x = rms_norm_torch(x, norm_weight, norm_eps, None)[0]
    y = F.linear(x, weight, bias)
    if gated:
        value, gate = y.chunk(2, dim=-1)
        y = value * F.silu(gate)
    if residual is None:
        return y
    return residual + y.to(torch.promote_types(residual.dtype, y.dtype))


def stacked_linear_torch(x, weights, norm_weight=None, norm_eps: float = 1e-5):
    """`tuple(x @ w.T for w in weights)`, x first replaced by `rms_norm(x, norm_weight, norm_eps)` (once)."""
    if norm_weight is not None:
        x = rms_norm_torch(x, norm_weight, norm_eps, None)[0]
    return tuple(F.linear(x, w) for w in weights)
