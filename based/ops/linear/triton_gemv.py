"""Matrix-vector product for one token (batch-1 decoding), one Triton launch with the epilogue fused.

A batch-1 decode step is a chain of matrix-vector products, so it is bound by reading the weights. Each
program owns BN output rows, accumulates `w * x` elementwise in a [BN, BK] fp32 tile over K and reduces it
once at the end; the next weight tile is loaded before the current one is used, so two are in flight. The gate
(`value * silu(gate)`, the value and gate rows read by the same program), bias and residual add happen on the
accumulator, so they cost no extra launch and no rounding in between.

Inside a captured decode graph on Hopper the kernel is chained to the previous one (`_backend.chain_options`):
it loads its first weight tile before waiting for the kernel that produces x, so the weight stream does not
stop at kernel boundaries. Weights must therefore not be written earlier in the same graph.

Launch shapes chosen on an H200 by the whole Based-1.3B batch-1 step replayed from a graph (the GEMVs are
chained there, so the best shape of a lone GEMV is not the best in the chain): 8 rows x 256 per program for
tall matrices (the 7168- and 5376-row projections, the 50264-row lm_head), one row x 1024 for the 1792- and
256-row ones, 4 warps: 1.247 ms per step, against 1.398 ms with 4 x 256 / 2 x 1024 (the best shapes of a lone
GEMV with cold weights) and 1.576 ms without chaining.

Inference only: `linear` uses the reference whenever a gradient is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from based.ops._backend import chain_options
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel

# (rows per program, K per iteration, warps); a gated program takes half the rows of each half.
TALL = (8, 256, 4)
SHORT = (1, 1024, 4)
TALL_ROWS = 4096
INTERPRETER = (4, 32)


@triton.jit
def _gemv_kernel(x, w, bias, residual, y, N, K, stride_w,
                 BN: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    let_next_kernel_start(PDL)
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_k = tl.arange(0, BK)
    p_w = w + o_n[:, None] * stride_w + o_k[None, :]
    gate_rows = N * stride_w  # the gate rows sit N rows below the value rows
    m_w = m_n[:, None] & (o_k < K)[None, :]
    b_w = tl.load(p_w, mask=m_w, other=0.0)
    b_wg = tl.load(p_w + gate_rows, mask=m_w, other=0.0) if GATED else b_w
    wait_for_previous_kernel(PDL)
    b_acc = tl.zeros([BN, BK], dtype=tl.float32)
    b_acc_gate = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        b_x = tl.load(x + k0 + o_k, mask=k0 + o_k < K, other=0.0).to(tl.float32)[None, :]
        m_next = m_n[:, None] & (k0 + BK + o_k < K)[None, :]
        b_w_next = tl.load(p_w + k0 + BK, mask=m_next, other=0.0)
        b_acc += b_w.to(tl.float32) * b_x
        b_w = b_w_next
        if GATED:
            b_wg_next = tl.load(p_w + gate_rows + k0 + BK, mask=m_next, other=0.0)
            b_acc_gate += b_wg.to(tl.float32) * b_x
            b_wg = b_wg_next
    b_y = tl.sum(b_acc, 1)
    if HAS_BIAS:
        b_y += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)
    if GATED:
        b_gate = tl.sum(b_acc_gate, 1)
        if HAS_BIAS:
            b_gate += tl.load(bias + N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_y = b_y * b_gate * tl.sigmoid(b_gate)
    if HAS_RESIDUAL:
        b_y += tl.load(residual + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@torch.library.custom_op("based::gemv", mutates_args=())
def _gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], gated: bool,
             chain: bool) -> Tensor:
    """`chain`: may the kernel be chained (`chain_options`), i.e. read weights before the previous kernel ends."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    x_row = x.reshape(K)
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=out_dtype)
    if x.device.type != "cuda":
        (BN, BK), launch = INTERPRETER, {}
    else:
        BN, BK, num_warps = TALL if weight.shape[0] >= TALL_ROWS else SHORT
        BN = max(1, BN // 2) if gated else BN  # a gated program reads its value rows and as many gate rows
        # One stage: the kernel double-buffers its weight tiles itself.
        launch = dict(num_warps=num_warps, num_stages=1)
    _gemv_kernel[(triton.cdiv(N, BN),)](
        x_row, weight, bias if bias is not None else x_row, residual.reshape(N) if residual is not None else y,
        y, N, K, weight.stride(0), BN=BN, BK=BK, GATED=gated, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, **launch,
        **(chain_options(x.device) if chain else dict(PDL=False)))
    return y


@_gemv_op.register_fake
def _(x, weight, bias, residual, gated, chain):
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    return x.new_empty(*x.shape[:-1], N, dtype=out_dtype)


def linear_triton(x, weight, bias, residual, gated: bool):
    """Same contract as `reference.linear_torch` for a single row of x (x.numel() == in_features) and a
    weight with unit stride along its rows."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"the Triton linear kernel takes one row (x.numel() == in_features, a batch-1 decode "
                         f"step), got x of shape {tuple(x.shape)}; use backend='torch'")
    # A copy is written by the kernel just before the GEMV, so that GEMV must not read it early (unchained).
    copied = weight.stride(-1) != 1
    return _gemv_op(x, weight.contiguous() if copied else weight, bias, residual, gated, not copied)
