"""Causal depthwise convolution (the short conv of BaseConv): parallel op and decode step.

Files: `reference.py` (plain PyTorch), `triton_conv.py` (the parallel op, plain or gated, forward and backward),
`triton_common.py` (the conv step as a Triton helper), `triton_step.py` (the fused decode step, optionally gated),
`interface.py` (checks + dispatch).
`linear_gated_conv1d_step` runs BaseConv's in_proj and its gated conv step together; at batch 1 its Triton path
is the matrix-vector kernel of `based.ops.linear` with the conv step fused (`based/ops/linear/triton_gemv.py`).
"""
from based.ops.short_conv.interface import (causal_conv1d, causal_conv1d_step, gated_conv1d, gated_conv1d_step,
                                            linear_gated_conv1d_step)

__all__ = ["causal_conv1d", "causal_conv1d_step", "gated_conv1d", "gated_conv1d_step", "linear_gated_conv1d_step"]
