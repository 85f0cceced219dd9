"""Linear layers of a decode step, with the norm before and the SwiGLU or conv gate or the residual add after fused
into one matrix-vector launch at batch 1: reference, Triton GEMV."""
from based.ops.linear.interface import linear, stacked_linear

__all__ = ["linear", "stacked_linear"]
