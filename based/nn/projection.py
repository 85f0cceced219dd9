"""`project(layer, x)`: an `nn.Linear` applied through `based.ops.linear`.

The layers keep `nn.Linear` modules (their parameter names are the checkpoints'), but call them through the
op so that a batch-1 decode step on a GPU runs the Triton matrix-vector kernel, with the pre-norm, the SwiGLU
or conv gate or the residual add fused where the caller asks for it (and several bias-free projections of one
input in one launch); everything else takes the cuBLAS reference path.
"""
from __future__ import annotations

import torch
from torch import nn

from based.nn.norm import RMSNorm
from based.ops import linear, stacked_linear


def project(layer: nn.Linear, x: torch.Tensor, *, norm: RMSNorm | None = None, **epilogue) -> torch.Tensor:
    """`layer(norm(x))` (`layer(x)` without a norm), then what `based.ops.linear` fuses after the product
    (`epilogue`: `gated`, `conv_state` and `conv_weight`, `residual`)."""
    return linear(x, layer.weight, layer.bias, **_norm_arguments(norm), **epilogue)


def project_stacked(layers: list[nn.Linear], x: torch.Tensor, *, norm: RMSNorm | None = None) -> tuple[torch.Tensor, ...]:
    """`tuple(project(layer, x, norm=norm) for layer in layers)` for bias-free layers (a layer's q, k and v):
    one matrix-vector launch for all of them when decoding one token on a GPU, one norm otherwise."""
    return stacked_linear(x, [layer.weight for layer in layers], **_norm_arguments(norm))


def _norm_arguments(norm: RMSNorm | None) -> dict:
    return {} if norm is None else dict(norm_weight=norm.weight, norm_eps=norm.eps)
