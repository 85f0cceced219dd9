"""Rotary position embeddings (RoPE), non-interleaved ("rotate half") layout.

Channel i of the first half and channel i of the second half form one pair, rotated by the angle
`position * base**(-2i / D)`. This is the layout of flash-attn's `interleaved=False` and of GPT-NeoX /
Llama, the one the released Based sliding-window layers were trained with.

The angles are computed from the positions on every call instead of being read from a cached table: it
works for any position without a maximum length and keeps no buffer that `model.to(torch.bfloat16)` could
round. This file is the plain PyTorch version (several elementwise kernels); `triton_kernel.py` does the
same in one launch.
"""
from __future__ import annotations

import torch


def inverse_frequencies(dim: int, base: float, device) -> torch.Tensor:
    """`[dim // 2]` float32: `base ** (-2i / dim)`, the angle per position of pair i."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    return base ** -exponents


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """`[T]` integer positions -> `[T, dim // 2]` float32 angles."""
    return positions.to(torch.float32)[:, None] * inverse_frequencies(dim, base, positions.device)[None, :]


def apply_rotary_torch(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    D = x.shape[-1]
    angles = rotary_angles(positions, D, base)[:, None, :]  # [T, 1, D/2], broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)
