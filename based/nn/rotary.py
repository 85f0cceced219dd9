"""Rotary embeddings for the layers: the op (`based.ops.rotary`) and the positions of a chunk of tokens."""
from __future__ import annotations

import torch

from based.ops.rotary import apply_rotary

__all__ = ["apply_rotary", "rotated_qkv", "token_positions"]


def token_positions(seqlen: int, start: torch.Tensor | None, device) -> torch.Tensor:
    """Positions `start .. start + seqlen - 1`; `start` is a 0-dim device tensor (never read on the host)."""
    if start is not None and seqlen == 1:
        return start.view(1)  # a decode step: no kernel to launch
    positions = torch.arange(seqlen, device=device)
    return positions if start is None else positions + start


def rotated_qkv(qkv: torch.Tensor, num_heads: int, start: torch.Tensor | None,
                base: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v `[B, T, H, D]` from a fused projection `[B, T, 3 * H * D]` (q, k, v in that order), q and k
    rotated to the tokens' positions (`token_positions(T, start)`) by one `apply_rotary` over both; with `base`
    None, not rotated."""
    B, T, _ = qkv.shape
    qkv = qkv.view(B, T, 3, num_heads, -1)
    if base is None:
        return qkv.unbind(2)
    # q and k sit next to each other, so [B, T, 2, H, D] -> [B, T, 2H, D] is a view: one launch rotates both.
    qk = apply_rotary(qkv[:, :, :2].flatten(2, 3), token_positions(T, start, qkv.device), base)
    q, k = qk.unflatten(2, (2, num_heads)).unbind(2)
    return q, k, qkv[:, :, 2]
