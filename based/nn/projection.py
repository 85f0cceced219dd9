"""The layers' projections: `nn.Linear` modules applied through the fused projection ops.

The layers keep `nn.Linear` modules (their parameter names are the checkpoints'), but call them through
`based.ops.linear` and its relatives so that a batch-1 decode step on a GPU runs the Triton matrix-vector
kernel, with the pre-norm, the SwiGLU or conv gate or the residual add fused where the caller asks for it (the
`norm`/`residual` seam of `based.nn.mixer`); everything else takes the cuBLAS reference path.
"""
from __future__ import annotations

import torch
from torch import nn

from based.nn.norm import RMSNorm
from based.ops import linear, linear_gated_conv1d_step, stacked_linear


def project(layer: nn.Linear, x: torch.Tensor, *, norm: RMSNorm | None = None, gated: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(norm(x))` (`layer(x)` without a norm), then the SwiGLU gate if `gated`, then `residual +` it."""
    return linear(x, layer.weight, layer.bias, gated=gated, residual=residual, **_fused_norm(norm))


def project_stacked(layers: list[nn.Linear], x: torch.Tensor, *, norm: RMSNorm | None = None) -> tuple[torch.Tensor, ...]:
    """`tuple(project(layer, x, norm=norm) for layer in layers)` for bias-free layers (a layer's q, k and v):
    one matrix-vector launch for all of them when decoding one token on a GPU, one norm otherwise."""
    return stacked_linear(x, [layer.weight for layer in layers], **_fused_norm(norm))


def project_conv_gated(layer: nn.Linear, x: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, *,
                       norm: RMSNorm | None = None) -> torch.Tensor:
    """One decode step `[B, 1, in]` -> `[B, 1, out]` of BaseConv's gated conv after `layer` (its in_proj):
    `gated_conv1d_step(*layer(norm(x)).chunk(2, -1), conv_state, conv_weight)`, advancing `conv_state`."""
    return linear_gated_conv1d_step(x[:, 0], layer.weight, layer.bias, conv_state, conv_weight,
                                    **_fused_norm(norm))[:, None]


def _fused_norm(norm: RMSNorm | None) -> dict:
    return {} if norm is None else norm.fused_arguments()
