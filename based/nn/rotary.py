"""Rotary position embeddings (RoPE), non-interleaved ("rotate half") layout.

Channel i of the first half and channel i of the second half form one pair, rotated by the angle
`position * base**(-2i / D)`. This is the layout of flash-attn's `interleaved=False` and of GPT-NeoX /
Llama, the one the released Based sliding-window layers were trained with.

The angles are computed from the positions on every call instead of being read from a cached table:
it costs one small elementwise kernel, works for any position without a maximum length, and keeps no
buffer that `model.to(torch.bfloat16)` could round.
"""
from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """`[T]` integer positions -> `[T, dim // 2]` float32 angles."""
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    inverse_frequencies = base ** -exponents
    return positions.to(torch.float32)[:, None] * inverse_frequencies[None, :]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate `x` `[B, T, H, D]` (D even) by the positions `[T]` of its tokens; computed in fp32.

    `positions` may be any integer tensor on x's device, e.g. `start + arange(T)` with `start` a 0-dim
    device tensor, so a decode step can be captured in a CUDA graph and replayed at later positions.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got x of shape {tuple(x.shape)}")
    angles = rotary_angles(positions, D, base)[:, None, :]  # [T, 1, D/2], broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


def token_positions(seqlen: int, start: torch.Tensor | None, device) -> torch.Tensor:
    """Positions `start .. start + seqlen - 1`; `start` is a 0-dim device tensor (never read on the host)."""
    positions = torch.arange(seqlen, device=device)
    return positions if start is None else positions + start
