"""Causal depthwise convolution (the short conv of BaseConv): parallel op and decode step.

Files: `reference.py` (plain PyTorch), `triton_step.py` (the fused decode step, optionally gated),
`interface.py` (checks + dispatch).
"""
from based.ops.short_conv.interface import causal_conv1d, causal_conv1d_step, gated_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step", "gated_conv1d_step"]
