"""Taylor linear attention: parallel op, recurrent step, state.

Files: `reference.py` (plain PyTorch, chunked), `interface.py` (checks + dispatch), `state.py`.
"""
from based.ops.linear_attention.interface import linear_attention, linear_attention_step
from based.ops.linear_attention.state import LinearAttentionState

__all__ = ["linear_attention", "linear_attention_step", "LinearAttentionState"]
