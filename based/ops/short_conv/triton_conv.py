"""Triton causal depthwise convolution over a sequence, forward and backward, in the `[B, T, D]` layout, plain or
gated as BaseConv uses it (`silu(conv(x)) * gate`).

The reference transposes to `[B, D, T]`, concatenates the state in front and calls `F.conv1d`: three passes over
the activations and a copy, each way (and the gate adds a pass for silu and one for the product). Here one program
per (block of tokens, block of channels, batch row) reads the K shifted input tiles it needs straight from x (and,
before the first token, from the state) and writes y, gated in the same pass; the backward reads dy the same way
for d x, and keeps each block's partial sums of d weight and d bias, which PyTorch adds up over the blocks. The
gated backward first turns dy into the conv output's gradient and the gate's (one pass that recomputes the conv),
then runs the plain backward on it. The state's own gradient and the returned state are a few values per channel
and stay in PyTorch (`causal_conv1d_triton`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from based.ops._layout import unit_stride
from based.ops._validate import check_kernel_dtype
from based.ops.linear_attention.state import accumulation_dtype

# Tokens x channels per program; the interpreter gets small blocks so CPU tests cover several of each.
BLOCK_T, BLOCK_D = 64, 128
INTERPRETER_BLOCK_T, INTERPRETER_BLOCK_D = 4, 8


@triton.jit
def _load_inputs(x, state, i_b, o_t, o_d, m_t, m_d, shift, stride_xb, stride_xt, stride_sb, stride_sd, stride_sk,
                 K: tl.constexpr, HAS_STATE: tl.constexpr):
    """Rows o_t - shift of the input in fp32: x where that is a token, the state's column K + (o_t - shift) before
    the first token (zeros without a state)."""
    o_src = o_t - shift
    m_x = (o_src >= 0) & m_t
    b_x = tl.load(x + i_b * stride_xb + o_src[:, None] * stride_xt + o_d[None, :],
                  mask=m_x[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        m_s = (o_src < 0) & m_t
        b_x += tl.load(state + i_b * stride_sb + o_d[None, :] * stride_sd + (K + o_src)[:, None] * stride_sk,
                       mask=m_s[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _program_conv(x, state, weight, bias, T, D, stride_xb, stride_xt, stride_sb, stride_sd, stride_sk, stride_wd,
                  stride_wk, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_STATE: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """This program's tile, (batch row, tokens o_t, channels o_d, their mask), and the conv output there in fp32."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t, o_d = i_t * BT + tl.arange(0, BT), i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(K):
        # Tap i meets the input K - 1 - i steps back.
        b_x = _load_inputs(x, state, i_b, o_t, o_d, m_t, m_d, K - 1 - i, stride_xb, stride_xt, stride_sb, stride_sd,
                           stride_sk, K, HAS_STATE)
        b_w = tl.load(weight + o_d * stride_wd + i * stride_wk, mask=m_d, other=0.0).to(tl.float32)
        b_y += b_x * b_w[None, :]
    if HAS_BIAS:
        b_y += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    return i_b, o_t, o_d, m_t[:, None] & m_d[None, :], b_y


@triton.jit
def _conv_fwd_kernel(x, state, weight, bias, gate, y, T, D, stride_xb, stride_xt, stride_sb, stride_sd, stride_sk,
                     stride_wd, stride_wk, stride_gb, stride_gt, stride_yb, stride_yt,
                     K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_STATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr):
    i_b, o_t, o_d, m, b_y = _program_conv(x, state, weight, bias, T, D, stride_xb, stride_xt, stride_sb, stride_sd,
                                          stride_sk, stride_wd, stride_wk, K, BT, BD, HAS_STATE, HAS_BIAS)
    if HAS_GATE:
        b_g = tl.load(gate + i_b * stride_gb + o_t[:, None] * stride_gt + o_d[None, :], mask=m, other=0.0)
        b_y = b_y * tl.sigmoid(b_y) * b_g.to(tl.float32)
    tl.store(y + i_b * stride_yb + o_t[:, None] * stride_yt + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd_kernel(x, state, weight, bias, gate, dy, dc, dgate, T, D, stride_xb, stride_xt, stride_sb, stride_sd,
                     stride_sk, stride_wd, stride_wk, stride_gb, stride_gt, stride_dyb, stride_dyt,
                     K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_STATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    """y = silu(c) * g: d c = dy g silu'(c), d g = dy silu(c), with c recomputed; both stored [B, T, D]
    contiguous in their buffers' dtypes."""
    i_b, o_t, o_d, m, b_c = _program_conv(x, state, weight, bias, T, D, stride_xb, stride_xt, stride_sb, stride_sd,
                                          stride_sk, stride_wd, stride_wk, K, BT, BD, HAS_STATE, HAS_BIAS)
    b_g = tl.load(gate + i_b * stride_gb + o_t[:, None] * stride_gt + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + i_b * stride_dyb + o_t[:, None] * stride_dyt + o_d[None, :], mask=m,
                   other=0.0).to(tl.float32)
    b_s = tl.sigmoid(b_c)
    o_out = (i_b * T + o_t[:, None]) * D + o_d[None, :]
    tl.store(dgate + o_out, (b_dy * b_c * b_s).to(dgate.dtype.element_ty), mask=m)
    tl.store(dc + o_out, (b_dy * b_g * b_s * (1.0 + b_c * (1.0 - b_s))).to(dc.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_kernel(x, state, weight, dy, dx, dw_part, db_part, T, D, stride_xb, stride_xt, stride_sb, stride_sd,
                     stride_sk, stride_wd, stride_wk, stride_dyb, stride_dyt, stride_dxb, stride_dxt,
                     K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_STATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t, o_d = i_t * BT + tl.arange(0, BT), i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < T, o_d < D
    # The partial sums of this block go to row (batch row, token block) of the [rows, K, D] buffer.
    i_part = i_b * tl.num_programs(0) + i_t
    b_dy = tl.load(dy + i_b * stride_dyb + o_t[:, None] * stride_dyt + o_d[None, :],
                   mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(K):
        b_w = tl.load(weight + o_d * stride_wd + i * stride_wk, mask=m_d, other=0.0).to(tl.float32)
        # d x_t gets w_i dy_{t + K - 1 - i}.
        o_dst = o_t + (K - 1 - i)
        m_dst = (o_dst < T) & m_t
        b_dy_later = tl.load(dy + i_b * stride_dyb + o_dst[:, None] * stride_dyt + o_d[None, :],
                             mask=m_dst[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_dx += b_dy_later * b_w[None, :]
        # d w_i gets dy_t times the input tap i read for y_t.
        b_x = _load_inputs(x, state, i_b, o_t, o_d, m_t, m_d, K - 1 - i, stride_xb, stride_xt, stride_sb, stride_sd,
                           stride_sk, K, HAS_STATE)
        tl.store(dw_part + (i_part * K + i) * D + o_d, tl.sum(b_dy * b_x, 0), mask=m_d)
    tl.store(dx + i_b * stride_dxb + o_t[:, None] * stride_dxt + o_d[None, :], b_dx.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])
    if HAS_BIAS:
        tl.store(db_part + i_part * D + o_d, tl.sum(b_dy, 0), mask=m_d)


def _blocks(device: torch.device) -> tuple[int, int]:
    return (INTERPRETER_BLOCK_T, INTERPRETER_BLOCK_D) if device.type == "cpu" else (BLOCK_T, BLOCK_D)


def _state_args(state: Optional[Tensor], x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    # Without a state the kernel never reads it (HAS_STATE is off): x stands in for the pointer.
    return (x, (0, 0, 0)) if state is None else (state, tuple(state.stride()))


def _conv_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor]):
    """What the forward and the gate backward launch with, x already unit-stride: (grid, the state's pointer and
    strides, the bias pointer, the constexprs)."""
    B, T, D = x.shape
    BT, BD = _blocks(x.device)
    state_arg, state_strides = _state_args(state, x)
    bias_arg = x if bias is None else unit_stride(bias)
    meta = dict(K=weight.shape[1], BT=BT, BD=BD, HAS_STATE=state is not None, HAS_BIAS=bias is not None)
    return (triton.cdiv(T, BT), triton.cdiv(D, BD), B), state_arg, state_strides, bias_arg, meta


def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor],
              gate: Optional[Tensor]) -> Tensor:
    x = unit_stride(x)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    gate_arg = x if gate is None else unit_stride(gate)  # never read without a gate
    grid, state_arg, state_strides, bias_arg, meta = _conv_launch(x, weight, bias, state)
    _conv_fwd_kernel[grid](
        x, state_arg, weight, bias_arg, gate_arg, y, x.shape[1], x.shape[2], x.stride(0), x.stride(1),
        *state_strides, *weight.stride(), gate_arg.stride(0), gate_arg.stride(1), y.stride(0), y.stride(1),
        HAS_GATE=gate is not None, **meta)
    return y


@torch.library.custom_op("based::causal_conv1d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor]) -> Tensor:
    """y `[B, T, D]` in x's dtype (see `reference.causal_conv1d_torch`)."""
    return _conv_fwd(x, weight, bias, state, None)


@_conv_op.register_fake
def _(x, weight, bias, state):
    return x.new_empty(x.shape)


@torch.library.custom_op("based::gated_conv1d", mutates_args=())
def _gated_op(x: Tensor, gate: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor]) -> Tensor:
    """silu(y) * gate `[B, T, D]` in x's dtype, y the conv in fp32 (see `reference.gated_conv1d_torch`)."""
    return _conv_fwd(x, weight, bias, state, gate)


@_gated_op.register_fake
def _(x, gate, weight, bias, state):
    return x.new_empty(x.shape)


@torch.library.custom_op("based::gated_conv1d_gate_bwd", mutates_args=())
def _gate_bwd_op(x: Tensor, gate: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor],
                 dy: Tensor) -> tuple[Tensor, Tensor]:
    """(d of the conv output, d gate), both `[B, T, D]` contiguous in x's dtype."""
    x, gate, dy = unit_stride(x), unit_stride(gate), unit_stride(dy)
    dc, dgate = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for _ in range(2))
    grid, state_arg, state_strides, bias_arg, meta = _conv_launch(x, weight, bias, state)
    _gate_bwd_kernel[grid](
        x, state_arg, weight, bias_arg, gate, dy, dc, dgate, x.shape[1], x.shape[2], x.stride(0), x.stride(1),
        *state_strides, *weight.stride(), gate.stride(0), gate.stride(1), dy.stride(0), dy.stride(1), **meta)
    return dc, dgate


@_gate_bwd_op.register_fake
def _(x, gate, weight, bias, state, dy):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("based::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(x: Tensor, weight: Tensor, state: Optional[Tensor], dy: Tensor,
                 has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d x in x's dtype, d weight [D, K] and d bias [D] in fp32; d bias is empty without a bias)."""
    B, T, D = x.shape
    K = weight.shape[1]
    x, dy = unit_stride(x), unit_stride(dy)
    dx = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
    BT, BD = _blocks(x.device)
    n_t = triton.cdiv(T, BT)
    dw_part = torch.empty(B * n_t, K, D, device=x.device, dtype=torch.float32)
    db_part = torch.empty(B * n_t if has_bias else 0, D, device=x.device, dtype=torch.float32)
    state_arg, state_strides = _state_args(state, x)
    _conv_bwd_kernel[(n_t, triton.cdiv(D, BD), B)](
        x, state_arg, weight, dy, dx, dw_part, db_part, T, D, x.stride(0), x.stride(1), *state_strides,
        *weight.stride(), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        K=K, BT=BT, BD=BD, HAS_STATE=state is not None, HAS_BIAS=has_bias)
    return dx, dw_part.sum(0).T.contiguous(), db_part.sum(0)


@_conv_bwd_op.register_fake
def _(x, weight, state, dy, has_bias):
    D = x.shape[-1]
    f32 = dict(dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(weight.shape, **f32), x.new_empty(D if has_bias else 0, **f32)


def _conv_grads(x, weight, bias_dtype, state, dy, need_d_state: bool):
    """(d x, d weight, d bias, d state) of the plain conv for its output's gradient dy."""
    dx, dw, db = _conv_bwd_op(x, weight, state, dy, bias_dtype is not None)
    d_state = None
    if state is not None and need_d_state:
        # State column j is the input j - K steps before token 0; tap i reads it for y_t with t = j - 1 - i.
        K = weight.shape[1]
        T = x.shape[1]
        acc = accumulation_dtype(dy.dtype)
        d_state = torch.zeros(state.shape, device=state.device, dtype=acc)
        for j in range(1, K):
            for i in range(j):
                if j - 1 - i < T:
                    d_state[..., j] += weight[:, i].to(acc) * dy[:, j - 1 - i].to(acc)
        d_state = d_state.to(state.dtype)
    return dx, dw.to(weight.dtype), None if bias_dtype is None else db.to(bias_dtype), d_state


def _setup_context(ctx, inputs, output):
    x, weight, bias, state = inputs
    ctx.save_for_backward(x, weight, state)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, state = ctx.saved_tensors
    return _conv_grads(x, weight, ctx.bias_dtype, state, dy, ctx.needs_input_grad[3])


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def _gated_setup_context(ctx, inputs, output):
    x, gate, weight, bias, state = inputs
    ctx.save_for_backward(x, gate, weight, bias, state)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gated_backward(ctx, dy):
    x, gate, weight, bias, state = ctx.saved_tensors
    dc, dgate = _gate_bwd_op(x, gate, weight, bias, state, dy)
    dx, dw, db, d_state = _conv_grads(x, weight, ctx.bias_dtype, state, dc, ctx.needs_input_grad[4])
    return dx, dgate, dw, db, d_state


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


def causal_conv1d_triton(x, weight, bias, initial_state, return_state: bool):
    """Same contract as `reference.causal_conv1d_torch`, on the Triton kernels (differentiable)."""
    check_kernel_dtype(x.dtype, "the Triton causal conv takes")
    y = _conv_op(x, weight, bias, initial_state)
    return _with_state(y, x, weight, initial_state) if return_state else y


def gated_conv1d_triton(x, gate, weight, bias, initial_state, return_state: bool):
    """Same contract as `reference.gated_conv1d_torch`, on the Triton kernels (differentiable; the conv output
    stays in fp32 until the single rounding of the gated output)."""
    check_kernel_dtype(x.dtype, "the Triton causal conv takes")
    y = _gated_op(x, gate, weight, bias, initial_state)
    return _with_state(y, x, weight, initial_state) if return_state else y


def _with_state(y, x, weight, initial_state):
    # The new state is the last K inputs: the tail of x, with the old state's newest columns in front when T < K.
    K, T = weight.shape[1], x.shape[1]
    acc = accumulation_dtype(x.dtype)
    tail = x[:, -K:].to(acc).transpose(1, 2)
    if T >= K:
        return y, tail.contiguous()
    old = initial_state.to(acc) if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2], K, dtype=acc)
    return y, torch.cat([old[..., T:], tail], dim=-1)
