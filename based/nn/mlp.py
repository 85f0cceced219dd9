"""The SwiGLU MLP of Based and Transformer++ blocks."""
from __future__ import annotations

import torch
from torch import nn

from based.nn.norm import RMSNorm
from based.nn.projection import project


class GatedMlp(nn.Module):
    """`fc2(value * silu(gate))` with `value, gate = fc1(x).chunk(2)`, no biases.

    fc1 is `[2 * hidden_dim, d_model]`: the first half of its rows makes the value, the second half the
    gate, the order of the released checkpoints (flash-attn's GatedMlp).
    """

    def __init__(self, d_model: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden_dim, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *,
                norm: RMSNorm | None = None) -> torch.Tensor:
        """`x` `[..., d_model]` -> `residual + mlp(norm(x))` (each part optional), the contract of the mixers'
        `norm` and `residual` in `based.nn.mixer`: fused into fc1's and fc2's kernels at batch 1."""
        return project(self.fc2, project(self.fc1, x, norm=norm, gated=True), residual=residual)
