"""Rotary embeddings for the layers: the op (`based.ops.rotary`) and the positions of a chunk of tokens."""
from __future__ import annotations

import torch

from based.ops.rotary import apply_rotary

__all__ = ["apply_rotary", "token_positions"]


def token_positions(seqlen: int, start: torch.Tensor | None, device) -> torch.Tensor:
    """Positions `start .. start + seqlen - 1`; `start` is a 0-dim device tensor (never read on the host)."""
    positions = torch.arange(seqlen, device=device)
    return positions if start is None else positions + start
