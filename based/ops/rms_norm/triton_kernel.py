"""One Triton launch for RMSNorm with the residual add before it (a decode step runs two per layer).

One program per row: it loads the row of x (and of the fp32 residual), adds them, stores the sum when
there is a residual, and writes the normalised row in the weight's dtype. Inference only: the
layers call it when no gradient is needed and use the reference otherwise.
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
def _rms_norm_kernel(x, residual, weight, y, s, D, eps, stride_x, stride_r, stride_y, stride_s,
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
    b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(y + i_row * stride_y + o_d, (b_s * b_rstd * b_w).to(y.dtype.element_ty), mask=m_d)


@torch.library.custom_op("based::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(y, s) as `reference.rms_norm_torch`; s is empty without a residual (the caller keeps x)."""
    D = x.shape[-1]
    # Rows are addressed through their stride, the values inside a row as dense (reshape keeps that: it copies
    # only when the rows cannot be a view).
    rows, weight = unit_stride(x).reshape(-1, D), unit_stride(weight)
    res = unit_stride(residual).reshape(-1, D) if residual is not None else rows
    y = torch.empty(x.shape, device=x.device, dtype=weight.dtype)
    s = torch.empty(x.shape if residual is not None else (0, D), device=x.device, dtype=torch.float32)
    y_rows, s_rows = y.view(-1, D), s.view(-1, D)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, y_rows, s_rows, D, eps, rows.stride(0), res.stride(0), y_rows.stride(0),
            s_rows.stride(0), BD=triton.next_power_of_2(D), HAS_RESIDUAL=residual is not None,
            **chain_options(x.device))
    return y, s


@_rms_norm_op.register_fake
def _(x, weight, residual, eps):
    s_shape = x.shape if residual is not None else (0, x.shape[-1])
    return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(s_shape, dtype=torch.float32)


def rms_norm_triton(x, weight, eps: float, residual):
    """Same contract as `reference.rms_norm_torch` for fp16/bf16/fp32 x and an fp32 residual."""
    y, s = _rms_norm_op(x, weight, residual, eps)
    return y, (None if residual is None else s)
