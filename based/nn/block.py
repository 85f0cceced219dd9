"""The pre-norm residual block shared by Based and Transformer++ models."""
from __future__ import annotations

import torch
from torch import nn

from based.nn.mixer import Mixer
from based.nn.mlp import GatedMlp
from based.nn.norm import RMSNorm


class Block(nn.Module):
    """`r = r + mixer(norm1(r)); r = r + mlp(norm2(r))` on a residual stream `r` kept in fp32.

    The residual is summed in fp32 even when the weights are bf16/fp16 (the released models'
    `residual_in_fp32`); each norm hands the mixer or MLP its input back in the weights' dtype.
    `mixer` is a `based.nn.mixer.Mixer`. For a single row (one token of one sequence: batch-1 decoding) the
    norms and residuals are handed to the mixer and the MLP (the `norm`/`residual` seam described there), so
    their projections' kernels do them; several rows take the norm kernel that also does the residual add,
    one launch for both.
    """

    def __init__(self, d_model: int, mixer: Mixer, mlp: GatedMlp, *, norm_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.norm1 = RMSNorm(d_model, norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, norm_eps, device=device, dtype=dtype)
        self.mlp = mlp

    def new_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None,
                  position: torch.Tensor | None = None):
        """The mixer's decode cache (the MLP and norms keep no state); `position` as in `based.nn.mixer`."""
        return self.mixer.new_cache(batch_size, max_seqlen, device=device, dtype=dtype, position=position)

    def forward(self, residual: torch.Tensor, cache=None) -> torch.Tensor:
        """`residual` `[B, T, d_model]` (any float dtype; summed in at least fp32) -> the updated residual."""
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        if residual.shape[:-1].numel() == 1:
            residual = self.mixer(residual, cache, norm=self.norm1, residual=residual)
            return self.mlp(residual, residual=residual, norm=self.norm2)
        hidden, residual = self.norm2(self.mixer(self.norm1(residual), cache), residual=residual)
        return self.mlp(hidden, residual=residual)
