"""RMSNorm, optionally fused with the residual add before it: reference, Triton kernel, dispatch."""
from based.ops.rms_norm.interface import rms_norm

__all__ = ["rms_norm"]
