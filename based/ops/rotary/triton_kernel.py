"""Rotary embeddings in one Triton launch (the reference takes about a dozen elementwise kernels, which
dominate a batch-1 decode step). One program per token: its angles from the token's position and the
cached inverse frequencies, then every head's pairs rotated in fp32. The rotation is orthogonal, so the
backward is the same kernel rotating the gradient by the opposite angles."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from based.ops._backend import chain_options
from based.ops._layout import unit_stride
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel
from based.ops.rotary.reference import inverse_frequencies


@functools.lru_cache(maxsize=None)
def _cached_inverse_frequencies(dim: int, base: float, device: torch.device) -> Tensor:
    """The reference's own values, computed once per (dim, base, device): a decode step replayed from a
    CUDA graph reads them without recomputing."""
    return inverse_frequencies(dim, base, device)


@triton.jit
def _rotary_kernel(x, positions, inv_freq, out, T, H,
                   stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh,
                   HALF: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr, INVERSE: tl.constexpr,
                   PDL: tl.constexpr):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    i_bt = tl.program_id(0)
    i_b, i_t = i_bt // T, i_bt % T
    o_h = tl.arange(0, BH)
    o_p = tl.arange(0, BP)
    m_p = o_p < HALF
    b_angle = tl.load(positions + i_t).to(tl.float32) * tl.load(inv_freq + o_p, mask=m_p, other=0.0)
    b_cos, b_sin = tl.cos(b_angle)[None, :], tl.sin(b_angle)[None, :]
    if INVERSE:
        b_sin = -b_sin
    m = (o_h < H)[:, None] & m_p[None, :]
    p_x1 = x + i_b * stride_xb + i_t * stride_xt + o_h[:, None] * stride_xh + o_p[None, :]
    b_x1 = tl.load(p_x1, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x1 + HALF, mask=m, other=0.0).to(tl.float32)
    p_o1 = out + i_b * stride_ob + i_t * stride_ot + o_h[:, None] * stride_oh + o_p[None, :]
    tl.store(p_o1, (b_x1 * b_cos - b_x2 * b_sin).to(out.dtype.element_ty), mask=m)
    tl.store(p_o1 + HALF, (b_x2 * b_cos + b_x1 * b_sin).to(out.dtype.element_ty), mask=m)


@torch.library.custom_op("based::apply_rotary", mutates_args=())
def _rotary_op(x: Tensor, positions: Tensor, base: float, inverse: bool) -> Tensor:
    """x rotated by the positions' angles (by their negatives when `inverse`)."""
    B, T, H, D = x.shape
    # Channels and positions are read as dense vectors; the token and head strides are arguments.
    x, positions = unit_stride(x), unit_stride(positions)
    out = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
    if out.numel():
        _rotary_kernel[(B * T,)](
            x, positions, _cached_inverse_frequencies(D, base, x.device), out, T, H,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            HALF=D // 2, BH=triton.next_power_of_2(H), BP=triton.next_power_of_2(D // 2), INVERSE=inverse,
            **chain_options(x.device))
    return out


@_rotary_op.register_fake
def _(x, positions, base, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, positions, base, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.base, ctx.inverse = base, inverse


def _backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return _rotary_op(grad, positions, ctx.base, not ctx.inverse), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rotary_triton(x, positions, base: float):
    """Same contract as `reference.apply_rotary_torch` for fp16/bf16/fp32 x, differentiable."""
    return _rotary_op(x, positions, base, False)
