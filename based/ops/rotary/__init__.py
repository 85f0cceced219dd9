"""Rotary position embeddings: reference, Triton kernel, dispatch."""
from based.ops.rotary.interface import apply_rotary

__all__ = ["apply_rotary"]
