"""Linear layers of a decode step, with the norm before and the SwiGLU gate or the residual add after fused into one
matrix-vector launch at batch 1: reference, Triton GEMV (whose conv-gate epilogue serves
`based.ops.linear_gated_conv1d_step`)."""
from based.ops.linear.interface import linear, stacked_linear

__all__ = ["linear", "stacked_linear"]
