"""The pre-norm residual block shared by Based and Transformer++ models."""
from __future__ import annotations

import torch
from torch import nn

from based.nn.mlp import GatedMlp
from based.nn.norm import RMSNorm


class Block(nn.Module):
    """`r = r + mixer(norm1(r)); r = r + mlp(norm2(r))` on a residual stream `r` kept in fp32.

    The residual is summed in fp32 even when the weights are bf16/fp16 (the released models'
    `residual_in_fp32`); each norm hands the mixer or MLP its input back in the weights' dtype.
    `mixer` is any module with `forward(x, cache=None, *, norm=None, residual=None)` returning
    `residual + mixer(norm(x))`, and `new_cache(batch_size, max_seqlen)`. The norms are handed to the mixer
    and MLP rather than applied here so that, decoding one token on a GPU, each runs inside the kernel of the
    projection after it, and the residual adds inside the kernel of the projection before them.
    """

    def __init__(self, d_model: int, mixer: nn.Module, mlp: GatedMlp, *, norm_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.norm1 = RMSNorm(d_model, norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, norm_eps, device=device, dtype=dtype)
        self.mlp = mlp

    def new_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None):
        """The mixer's decode cache (the MLP and norms keep no state)."""
        return self.mixer.new_cache(batch_size, max_seqlen, device=device, dtype=dtype)

    def forward(self, residual: torch.Tensor, cache=None) -> torch.Tensor:
        """`residual` `[B, T, d_model]` (any float dtype; summed in at least fp32) -> the updated residual."""
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        residual = self.mixer(residual, cache, norm=self.norm1, residual=residual)
        return self.mlp(residual, residual=residual, norm=self.norm2)
