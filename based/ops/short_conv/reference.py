"""Causal depthwise convolution in plain PyTorch.

y_t = sum_{i<K} weight[:, i] * x_{t-K+1+i} (+ bias), with the inputs before the chunk taken from the
state (the last K inputs, oldest first) or zeros. Runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from based.ops.linear.reference import linear_torch
from based.ops.linear_attention.state import accumulation_dtype


def causal_conv1d_torch(x, weight, bias, initial_state, return_state: bool):
    B, T, D = x.shape
    K = weight.shape[1]
    acc = accumulation_dtype(x.dtype)
    if initial_state is None:
        initial_state = x.new_zeros(B, D, K, dtype=acc)
    # The K inputs before the chunk, then the chunk: [B, D, K + T], oldest first.
    history = torch.cat([initial_state.to(acc), x.to(acc).transpose(1, 2)], dim=-1)
    # y_t reads the K inputs ending at t; the oldest stored input is one step older than y_0 needs.
    # conv1d is a cross-correlation, so weight[:, i] meets input t - K + 1 + i, as defined.
    y = F.conv1d(history[..., 1:], weight.to(acc)[:, None], None if bias is None else bias.to(acc), groups=D)
    y = y.transpose(1, 2).to(x.dtype)
    if not return_state:
        return y
    # contiguous(): a [B, D, K] copy, so the state does not keep the whole history alive.
    return y, history[..., -K:].contiguous()


def gated_conv1d_torch(x, gate, weight, bias, initial_state, return_state: bool):
    # y is rounded to x's dtype before silu and the gate, as BaseConv's unfused forward does.
    out = causal_conv1d_torch(x, weight, bias, initial_state, return_state)
    y, state = out if return_state else (out, None)
    gated = F.silu(y) * gate
    return (gated, state) if return_state else gated


def causal_conv1d_step_torch(x, conv_state, weight, bias):
    acc = accumulation_dtype(x.dtype)
    # Shift left and append in one copy from a fresh tensor: copying a tensor onto a shifted view of
    # itself would read memory it is overwriting.
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1))
    y = (conv_state.to(acc) * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def gated_conv1d_step_torch(x, gate, conv_state, weight, bias):
    # y is rounded to x's dtype before the gate, as BaseConv's parallel path rounds the conv output.
    return F.silu(causal_conv1d_step_torch(x, conv_state, weight, bias)) * gate


def linear_gated_conv1d_step_torch(x, weight, bias, conv_state, conv_weight, norm_weight, norm_eps: float):
    """BaseConv's in_proj then its gated conv step: `gated_conv1d_step(u1, u2, ...)` with
    `u1, u2 = linear(x, weight, bias, norm_weight=...).chunk(2)`."""
    u1, u2 = linear_torch(x, weight, bias, None, False, norm_weight, norm_eps).chunk(2, dim=-1)
    return gated_conv1d_step_torch(u1, u2, conv_state, conv_weight, None)
