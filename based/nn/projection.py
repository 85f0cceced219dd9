"""`project(layer, x)`: an `nn.Linear` applied through `based.ops.linear`.

The layers keep `nn.Linear` modules (their parameter names are the checkpoints'), but call them through the
op so that a batch-1 decode step on a GPU runs the Triton matrix-vector kernel, with the pre-norm, the SwiGLU
gate or the residual add fused where the caller asks for it; everything else takes the cuBLAS reference path.
"""
from __future__ import annotations

import torch
from torch import nn

from based.nn.norm import RMSNorm
from based.ops import linear


def project(layer: nn.Linear, x: torch.Tensor, *, norm: RMSNorm | None = None, **epilogue) -> torch.Tensor:
    """`layer(norm(x))` (`layer(x)` without a norm), then what `based.ops.linear` fuses after the product
    (`epilogue`: `gated`, `conv_state` and `conv_weight`, `residual`)."""
    if norm is not None:
        epilogue.update(norm_weight=norm.weight, norm_eps=norm.eps)
    return linear(x, layer.weight, layer.bias, **epilogue)


def normalize_once(x: torch.Tensor, norm: RMSNorm | None) -> tuple[torch.Tensor, RMSNorm | None]:
    """`(x, norm)` for a layer that projects x several times: a single row keeps its norm for each projection
    (fused into each matrix-vector kernel, no launch of its own), several rows are normalised here once."""
    if norm is None or x.shape[:-1].numel() == 1:
        return x, norm
    return norm(x), None
