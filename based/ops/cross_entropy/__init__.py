"""Cross-entropy of a linear layer's outputs (an LM head) without the full logits.

Files: `reference.py` (plain PyTorch over the full logits), `chunked.py` (chunks of tokens, gradients in the same
pass), `interface.py` (checks + dispatch).
"""
from based.ops.cross_entropy.interface import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
