"""RMSNorm in plain PyTorch: normalise in fp32 (fp64 for fp64 inputs), round once to the weight's dtype."""
from __future__ import annotations

import torch


def rms_norm_torch(x, weight, eps: float, residual):
    """(y, s): s = residual + x in at least fp32 (None without a residual), y = RMSNorm(s or x)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    s = None if residual is None else residual.to(torch.promote_types(residual.dtype, acc)) + x
    normed_input = x.to(acc) if s is None else s
    normed = normed_input * torch.rsqrt(normed_input.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(normed.dtype)).to(weight.dtype), s
