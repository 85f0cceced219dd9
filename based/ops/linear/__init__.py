"""Linear layers of a decode step, with the SwiGLU gate or the residual add fused: reference, Triton GEMV."""
from based.ops.linear.interface import linear

__all__ = ["linear"]
