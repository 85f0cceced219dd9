"""RMSNorm, computed in fp32 whatever the input dtype."""
from __future__ import annotations

import torch
from torch import nn

from based.ops import rms_norm


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight`, output in the weight's dtype.

    The blocks feed it the fp32 residual stream; normalizing in fp32 and casting once at the end is
    what the released models' fused norm did, and keeps bf16 models from losing the residual's low bits.
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The normalised `x` in the weight's dtype; with `residual` (the fp32 stream), `(norm(residual + x),
        residual + x)` from one pass (one kernel on a GPU at inference)."""
        return rms_norm(x, self.weight, self.eps, residual=residual)

    def fused_arguments(self) -> dict:
        """The keyword arguments (`norm_weight`, `norm_eps`) with which the projection ops apply this norm to
        their input themselves, inside their batch-1 matrix-vector kernel (`based.nn.mixer`)."""
        return dict(norm_weight=self.weight, norm_eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
