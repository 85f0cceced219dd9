"""BaseConv, the Based gated short-convolution mixer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from based.nn._validate import check_cache_batch, check_hidden_states, parameter_placement
from based.nn.norm import RMSNorm
from based.nn.projection import project, project_conv_gated
from based.ops import causal_conv1d, causal_conv1d_step, gated_conv1d
from based.ops.linear_attention.state import accumulation_dtype


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over the sequence, `kernel_size` taps per channel, no bias.

    The weight is held by an `nn.Conv1d` so that its name and shape are the released checkpoints'
    `conv.conv.weight` `[channels, 1, kernel_size]`; the convolution itself runs through
    `based.ops.causal_conv1d`, which pads causally and carries the decode state.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                              device=device, dtype=dtype)

    @property
    def kernel_size(self) -> int:
        return self.conv.weight.shape[-1]

    @property
    def weight(self) -> torch.Tensor:
        """The taps as the ops take them: `[channels, kernel_size]`, a view of the Conv1d weight."""
        return self.conv.weight.squeeze(1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, D]`; `state` `[B, D, kernel_size]` (the last inputs, oldest first) is advanced in place."""
        if state is None:
            return causal_conv1d(x, self.weight)
        if x.shape[1] == 1:
            return causal_conv1d_step(x[:, 0], state, self.weight)[:, None]
        y, new_state = causal_conv1d(x, self.weight, initial_state=state, return_state=True)
        state.copy_(new_state)
        return y


class BaseConv(nn.Module):
    """`out_proj(silu(conv(u1)) * u2)` with `u1, u2 = in_proj(x).split(d_inner)`.

    `d_inner = expand_proj * d_model // 2` (2 * d_model for the released expand_proj = 4). Projections
    have biases, the convolution has none. Parameters: `in_proj` `[2 * d_inner, d_model]`, `conv.conv`
    `[d_inner, 1, kernel_size]`, `out_proj` `[d_model, d_inner]`, the released names.

    A mixer in the sense of `based.nn.mixer`. Decoding: the cache is the last `kernel_size` conv inputs per
    channel, `[B, d_inner, kernel_size]` fp32, from `layer.new_cache(batch_size)`. A one-token step runs in_proj,
    conv, silu and gate as one `based.ops.linear_gated_conv1d_step`.
    """

    def __init__(self, d_model: int, *, expand_proj: int = 4, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        if expand_proj * d_model % 2:
            raise ValueError(f"expand_proj * d_model must be even, got {expand_proj} * {d_model}")
        self.d_model = d_model
        self.d_inner = expand_proj * d_model // 2
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, device=device, dtype=dtype)
        self.conv = ShortConvolution(self.d_inner, kernel_size, device=device, dtype=dtype)
        self.out_proj = nn.Linear(self.d_inner, d_model, device=device, dtype=dtype)

    def new_cache(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None,
                  position: torch.Tensor | None = None) -> torch.Tensor:
        """Zeros `[batch_size, d_inner, kernel_size]`; the size does not depend on `max_seqlen` (and a conv needs
        no `position`)."""
        device, dtype = parameter_placement(self, device, dtype)
        return torch.zeros(batch_size, self.d_inner, self.conv.kernel_size, device=device,
                           dtype=accumulation_dtype(dtype))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, d_model]` -> `[B, T, d_model]`; with `cache`, continue from it and advance it. `norm` and
        `residual`: see `based.nn.mixer`."""
        check_hidden_states(x, self.d_model)
        if cache is not None:
            if not isinstance(cache, torch.Tensor):
                raise TypeError(f"BaseConv needs a conv-state tensor cache (from its new_cache), "
                                f"got {type(cache).__name__}")
            check_cache_batch(cache.shape[0], x)
        if cache is not None and x.shape[1] == 1:
            y = project_conv_gated(self.in_proj, x, cache, self.conv.weight, norm=norm)
        else:
            u1, u2 = project(self.in_proj, x, norm=norm).split(self.d_inner, dim=-1)
            y = gated_conv1d(u1, u2, self.conv.weight) if cache is None else F.silu(self.conv(u1, cache)) * u2
        return project(self.out_proj, y, residual=residual)
