"""Fused Triton decode step of the causal depthwise convolution, optionally with BaseConv's gate.

One program per (batch row, block of channels) shifts those channels' conv state left by one in place,
writes the new input at its end and takes the K-tap dot product in fp32; with a gate it returns
`silu(y) * gate`, so a BaseConv decode step is one launch between its projections. Channels are
independent, so no two programs touch the same state. At decode sizes the step moves a few kilobytes and
is bound by launch latency, which is why one fixed launch configuration serves every shape. It is compiled
without FMA contraction for the reason `based.ops.sliding_window.triton_decode` gives: the threads sharing a
channel's taps must round its sum alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from based.ops._backend import chain_options
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel
from based.ops._validate import check_kernel_dtype
from based.ops.short_conv.triton_common import conv_step

CHANNELS_PER_BLOCK = 128
NUM_WARPS = 4


@triton.jit
def _step_kernel(
    x, gate, conv_state, weight, bias, y, D, K,
    stride_xb, stride_xd, stride_gb, stride_gd, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
    stride_bias, stride_yb,
    BD: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(x + i_b * stride_xb + o_d * stride_xd, mask=m_d, other=0.0)
    b_y = conv_step(b_x, conv_state + i_b * stride_sb + o_d * stride_sd, weight + o_d * stride_wd, m_d, stride_sk,
                    stride_wk, K, BK)
    if HAS_BIAS:
        b_y += tl.load(bias + o_d * stride_bias, mask=m_d, other=0.0).to(tl.float32)
    if GATED:
        b_gate = tl.load(gate + i_b * stride_gb + o_d * stride_gd, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * tl.sigmoid(b_y) * b_gate
    tl.store(y + i_b * stride_yb + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


@torch.library.custom_op("based::causal_conv1d_step", mutates_args=("conv_state",))
def _step_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor]) -> Tensor:
    """y `[B, D]` (silu(y) * gate with a gate); advances conv_state `[B, D, K]` in place."""
    B, D = x.shape
    K = weight.shape[1]
    y = torch.empty(B, D, device=x.device, dtype=x.dtype)
    # Absent tensors are never read (HAS_BIAS / GATED are off): x stands in for their pointers.
    gate_or_x, bias_or_x = (x if t is None else t for t in (gate, bias))
    _step_kernel[(B, triton.cdiv(D, CHANNELS_PER_BLOCK))](
        x, gate_or_x, conv_state, weight, bias_or_x, y, D, K,
        *x.stride(), *gate_or_x.stride(), *conv_state.stride(), *weight.stride(), bias_or_x.stride(0), y.stride(0),
        BD=CHANNELS_PER_BLOCK, BK=triton.next_power_of_2(K), HAS_BIAS=bias is not None, GATED=gate is not None,
        num_warps=NUM_WARPS, enable_fp_fusion=False, **chain_options(x.device))
    return y


@_step_op.register_fake
def _(x, conv_state, weight, bias, gate):
    return x.new_empty(x.shape)


def _check_dtype(x: Tensor) -> None:
    check_kernel_dtype(x.dtype, "the Triton short-conv step takes")


def causal_conv1d_step_triton(x, conv_state, weight, bias):
    """Same contract as `reference.causal_conv1d_step_torch`, in one Triton launch."""
    _check_dtype(x)
    return _step_op(x, conv_state, weight, bias, None)


def gated_conv1d_step_triton(x, gate, conv_state, weight, bias):
    """Same contract as `reference.gated_conv1d_step_torch`, in one Triton launch (silu and gate in fp32)."""
    _check_dtype(x)
    return _step_op(x, conv_state, weight, bias, gate)
