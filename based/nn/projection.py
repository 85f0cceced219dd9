"""`project(layer, x)`: an `nn.Linear` applied through `based.ops.linear`.

The layers keep `nn.Linear` modules (their parameter names are the checkpoints'), but call them through the
op so that a batch-1 decode step on a GPU runs the Triton matrix-vector kernel, with the SwiGLU gate or the
residual add fused where the caller asks for it; everything else takes the cuBLAS reference path.
"""
from __future__ import annotations

import torch
from torch import nn

from based.ops import linear


def project(layer: nn.Linear, x: torch.Tensor, *, residual: torch.Tensor | None = None,
            gated: bool = False) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias, residual=residual, gated=gated)
