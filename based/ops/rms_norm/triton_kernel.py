"""Triton RMSNorm with the residual add before it (a decode step runs two per layer), forward and backward.

Forward, one program per row: it loads the row of x (and of the fp32 residual), adds them, stores the sum when
there is a residual, the row's 1/rms (for the backward) and the normalised row in the weight's dtype.
Backward, one program per block of rows: it recomputes each row's normalised values from the saved sum (or x)
and 1/rms, writes d(sum) = d x = d residual (plus the gradient that reached the sum as the next residual), and
keeps the block's partial sum of d weight, which PyTorch adds up over the blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from based.ops._backend import chain_options
from based.ops._layout import unit_stride
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(x, residual, weight, y, s, rstd, D, eps, stride_x, stride_r, stride_y, stride_s,
                     BD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    i_row = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_s = tl.load(x + i_row * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        b_s += tl.load(residual + i_row * stride_r + o_d, mask=m_d, other=0.0)
        tl.store(s + i_row * stride_s + o_d, b_s, mask=m_d)
    b_rstd = tl.rsqrt(tl.sum(b_s * b_s, 0) / D + eps)
    tl.store(rstd + i_row, b_rstd)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(y + i_row * stride_y + o_d, (b_s * b_rstd * b_w).to(y.dtype.element_ty), mask=m_d)


@triton.jit
def _rms_norm_bwd_kernel(s, rstd, weight, dy, ds_out, ds, dw_part, n_rows, D, stride_s, stride_dy, stride_dso,
                         stride_ds, ROWS: tl.constexpr, BD: tl.constexpr, HAS_DS_OUT: tl.constexpr):
    i_block = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for i in range(ROWS):
        i_row = i_block * ROWS + i
        if i_row < n_rows:
            b_n = tl.load(s + i_row * stride_s + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_r = tl.load(rstd + i_row)
            b_n = b_n * b_r
            b_dy = tl.load(dy + i_row * stride_dy + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_dw += b_dy * b_n
            b_dn = b_dy * b_w
            b_ds = b_r * (b_dn - b_n * (tl.sum(b_dn * b_n, 0) / D))
            if HAS_DS_OUT:
                b_ds += tl.load(ds_out + i_row * stride_dso + o_d, mask=m_d, other=0.0).to(tl.float32)
            tl.store(ds + i_row * stride_ds + o_d, b_ds.to(ds.dtype.element_ty), mask=m_d)
    tl.store(dw_part + i_block * D + o_d, b_dw, mask=m_d)


@torch.library.custom_op("based::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, s, rstd) as `reference.rms_norm_torch` plus each row's 1/rms (fp32, x's leading shape); s is empty
    without a residual (the caller keeps x)."""
    D = x.shape[-1]
    # Rows are addressed through their stride, the values inside a row as dense (reshape keeps that: it copies
    # only when the rows cannot be a view).
    rows, weight = unit_stride(x).reshape(-1, D), unit_stride(weight)
    res = unit_stride(residual).reshape(-1, D) if residual is not None else rows
    y = torch.empty(x.shape, device=x.device, dtype=weight.dtype)
    s = torch.empty(x.shape if residual is not None else (0, D), device=x.device, dtype=torch.float32)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    y_rows, s_rows = y.view(-1, D), s.view(-1, D)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, y_rows, s_rows, rstd, D, eps, rows.stride(0), res.stride(0), y_rows.stride(0),
            s_rows.stride(0), BD=triton.next_power_of_2(D), HAS_RESIDUAL=residual is not None,
            **chain_options(x.device))
    return y, s, rstd


@_rms_norm_op.register_fake
def _(x, weight, residual, eps):
    s_shape = x.shape if residual is not None else (0, x.shape[-1])
    return (x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(s_shape, dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


# Rows per backward program: enough that the partial sums of d weight ([programs, D] fp32) stay small.
BACKWARD_ROWS = 64
INTERPRETER_BACKWARD_ROWS = 4


@torch.library.custom_op("based::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(s: Tensor, rstd: Tensor, weight: Tensor, dy: Tensor, ds_out: Optional[Tensor],
                     ds_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(d s in `ds_dtype` with s's shape, d weight in weight's dtype): `s` is the normalised input (residual + x,
    or x), `ds_out` the gradient that reached s itself (as the next residual), if any."""
    D = s.shape[-1]
    s_rows, dy_rows = unit_stride(s).reshape(-1, D), unit_stride(dy).reshape(-1, D)
    dso = unit_stride(ds_out).reshape(-1, D) if ds_out is not None else dy_rows
    ds = torch.empty(s.shape, device=s.device, dtype=ds_dtype)
    ds_rows = ds.view(-1, D)
    n_rows = s_rows.shape[0]
    block = INTERPRETER_BACKWARD_ROWS if s.device.type == "cpu" else BACKWARD_ROWS
    dw_part = torch.empty(triton.cdiv(n_rows, block), D, device=s.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(dw_part.shape[0],)](
        s_rows, rstd.reshape(-1).contiguous(), unit_stride(weight), dy_rows, dso, ds_rows, dw_part, n_rows, D,
        s_rows.stride(0), dy_rows.stride(0), dso.stride(0), ds_rows.stride(0), ROWS=block,
        BD=triton.next_power_of_2(D), HAS_DS_OUT=ds_out is not None)
    return ds, dw_part.sum(0).to(weight.dtype)


@_rms_norm_bwd_op.register_fake
def _(s, rstd, weight, dy, ds_out, ds_dtype):
    return s.new_empty(s.shape, dtype=ds_dtype), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, s, rstd = output
    ctx.save_for_backward(x if residual is None else s, rstd, weight)
    ctx.x_dtype, ctx.has_residual = x.dtype, residual is not None


def _backward(ctx, dy, ds_out, _drstd):
    normed_input, rstd, weight = ctx.saved_tensors
    if dy is None:  # only the sum was used downstream
        dy = torch.zeros(normed_input.shape, device=normed_input.device, dtype=weight.dtype)
    has_ds_out = ctx.has_residual and ds_out is not None and ds_out.numel() > 0
    # With a residual, d s is d residual (fp32) and, cast, d x; without one it is d x.
    ds_dtype = torch.float32 if ctx.has_residual else ctx.x_dtype
    ds, dw = _rms_norm_bwd_op(normed_input, rstd, weight, dy, ds_out if has_ds_out else None, ds_dtype)
    dx = ds.to(ctx.x_dtype) if ctx.has_residual else ds
    return dx, dw, ds if ctx.has_residual else None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_triton(x, weight, eps: float, residual):
    """Same contract as `reference.rms_norm_torch` for fp16/bf16/fp32 x and an fp32 residual, differentiable."""
    y, s, _ = _rms_norm_op(x, weight, residual, eps)
    return y, (None if residual is None else s)
