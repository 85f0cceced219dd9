"""Matrix-vector product for one token (batch-1 decoding), one Triton launch with prologue and epilogue fused.

A batch-1 decode step is a chain of matrix-vector products, so it is bound by reading the weights. Each
program owns BN output rows. It loads the first PRE columns of its rows in one tile, and the first BK-column
tile of the rest, then reduces `w * x` over K (the rest in BK tiles, the next one loaded before the current one
is used). The pre-norm (`rms_norm(x)`: each program reduces the whole row of x itself, so the norm needs no
launch of its own), the gate (`value * silu(gate)`, the value and gate rows read by the same program) or
BaseConv's conv gate (`silu(conv_step(u1)) * u2`, the program owning channel c advancing its conv state), bias
and residual add happen in registers, so they cost no extra launch and no rounding in between. A stacked
launch runs over the rows of up to three weights in turn (a layer's separate q, k and v).

Inside a captured decode graph on Hopper the kernel is chained to the previous one (`_backend.chain_options`):
it loads its weight tiles before waiting for the kernel that produces x, so the weight stream does not stop at
kernel boundaries. Weights must therefore not be written earlier in the same graph.

Launch shapes are chosen on the whole Based-1.3B batch-1 step replayed from a graph, not on a lone GEMV, since
the GEMVs are chained there (measurements and rejected alternatives: docs/PERFORMANCE.md). Short matrices (the
1792-row projections, linear attention's stacked q, k, v): two rows per program, whole rows (K <= 4096) loaded
before the wait, 2 warps. Tall ones (7168 and 5376 rows, the 50264-row lm_head): 16 rows x 256 columns per tile,
8 warps: their whole rows do not fit in registers with all programs resident while the kernel before them runs.

Inference only: `linear` uses the reference whenever a gradient is needed.
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
from based.ops.short_conv.triton_common import conv_step

# (rows per program, columns loaded before the wait, K per later iteration, warps); a gated program takes half
# the rows of each half. A short matrix's programs load their whole rows (K <= 4096) before waiting. A tall
# one's do not fit in registers at once (a whole 7168 x 1792 matrix is three quarters of an H200's register
# file), so they load two 256-column tiles and stream the rest. "Short" and "tall" go by all the rows of the
# launch (q, k and v of a stacked launch together).
TALL = (16, 256, 256, 8)
SHORT = (2, 4096, 512, 2)
TALL_ROWS = 4096
INTERPRETER = (4, 16, 32)
# Columns of x read at once for the norm's sum of squares (fewer than K: a loop).
NORM_BLOCK = 4096


@triton.jit
def _input_tile(x, norm_weight, b_rstd, o_k, m_k, NORM: tl.constexpr):
    """x[o_k] in fp32; with NORM, RMS-normalised (`b_rstd`) and scaled, kept in fp32 (the standalone RMSNorm
    rounds it to the weights' dtype before the matmul; here it never leaves registers)."""
    b_x = tl.load(x + o_k, mask=m_k, other=0.0).to(tl.float32)
    if NORM:
        b_x = b_x * b_rstd * tl.load(norm_weight + o_k, mask=m_k, other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _gemv_kernel(x, norm_weight, w, w1, w2, bias, residual, y, conv_state, conv_weight, N, N0, N1, K, stride_w,
                 stride_w1, stride_w2, eps, KS, stride_sd, stride_sk, stride_cd, stride_ck,
                 BN: tl.constexpr, PRE: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr, NORM: tl.constexpr,
                 STACKED: tl.constexpr, GATED: tl.constexpr, CONV: tl.constexpr, BKS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """GATED: `value * silu(gate)` of the two row halves; CONV: `silu(conv_step(value)) * gate` instead, the value
    entering the conv state (`[N, KS]` taps per row, oldest first, advanced in place) as its newest tap.
    STACKED: the N rows are those of three weights, N0 of `w`, N1 of `w1`, the rest of `w2` (a layer's q, k, v)."""
    let_next_kernel_start(PDL)
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    if STACKED:
        p_w = tl.where((o_n < N0)[:, None], w + o_n[:, None] * stride_w,
                       tl.where((o_n < N0 + N1)[:, None], w1 + (o_n - N0)[:, None] * stride_w1,
                                w2 + (o_n - N0 - N1)[:, None] * stride_w2))
    else:
        p_w = w + o_n[:, None] * stride_w
    gate_rows = N * stride_w  # the gate rows sit N rows below the value rows
    # Weights do not depend on the previous kernel: load the first PRE columns, and the first tile of the loop
    # over the rest, before waiting for it.
    o_p = tl.arange(0, PRE)
    m_p = m_n[:, None] & (o_p < K)[None, :]
    b_w = tl.load(p_w + o_p[None, :], mask=m_p, other=0.0)
    b_wg = tl.load(p_w + gate_rows + o_p[None, :], mask=m_p, other=0.0) if GATED else b_w
    o_k = tl.arange(0, BK)
    m_k = m_n[:, None] & (PRE + o_k < K)[None, :]
    b_wk = tl.load(p_w + PRE + o_k[None, :], mask=m_k, other=0.0)
    b_wkg = tl.load(p_w + gate_rows + PRE + o_k[None, :], mask=m_k, other=0.0) if GATED else b_wk
    wait_for_previous_kernel(PDL)
    b_rstd = 0.0
    if NORM:  # every program reduces the whole row itself: no kernel (and no wait) between norm and GEMV
        o_s = tl.arange(0, NB)
        b_sq = tl.zeros([NB], dtype=tl.float32)
        for k0 in range(0, K, NB):
            b_s = tl.load(x + k0 + o_s, mask=k0 + o_s < K, other=0.0).to(tl.float32)
            b_sq += b_s * b_s
        b_rstd = tl.rsqrt(tl.sum(b_sq, 0) / K + eps)
    b_x = _input_tile(x, norm_weight, b_rstd, o_p, o_p < K, NORM)[None, :]
    b_y = tl.sum(b_w.to(tl.float32) * b_x, 1)
    b_gate = tl.sum(b_wg.to(tl.float32) * b_x, 1) if GATED else b_y
    b_acc = tl.zeros([BN, BK], dtype=tl.float32)
    b_acc_gate = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(PRE, K, BK):
        b_xk = _input_tile(x, norm_weight, b_rstd, k0 + o_k, k0 + o_k < K, NORM)[None, :]
        m_next = m_n[:, None] & (k0 + BK + o_k < K)[None, :]
        b_w_next = tl.load(p_w + k0 + BK + o_k[None, :], mask=m_next, other=0.0)
        b_acc += b_wk.to(tl.float32) * b_xk
        b_wk = b_w_next
        if GATED:
            b_wg_next = tl.load(p_w + gate_rows + k0 + BK + o_k[None, :], mask=m_next, other=0.0)
            b_acc_gate += b_wkg.to(tl.float32) * b_xk
            b_wkg = b_wg_next
    b_y += tl.sum(b_acc, 1)
    if HAS_BIAS:
        b_y += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)
    if GATED:
        b_gate += tl.sum(b_acc_gate, 1)
        if HAS_BIAS:
            b_gate += tl.load(bias + N + o_n, mask=m_n, other=0.0).to(tl.float32)
        if CONV:
            b_y = conv_step(b_y, conv_state + o_n * stride_sd, conv_weight + o_n * stride_cd, m_n, stride_sk,
                            stride_ck, KS, BKS)
            b_y = b_y * tl.sigmoid(b_y) * b_gate
        else:
            b_y = b_y * b_gate * tl.sigmoid(b_gate)
    if HAS_RESIDUAL:
        b_y += tl.load(residual + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@torch.library.custom_op("based::gemv", mutates_args=("conv_state",))
def _gemv_op(x: Tensor, norm_weight: Optional[Tensor], norm_eps: float, weight: Tensor, more_weights: list[Tensor],
             bias: Optional[Tensor], residual: Optional[Tensor], gated: bool, conv_state: Optional[Tensor],
             conv_weight: Optional[Tensor], chain: bool) -> Tensor:
    """`more_weights`: up to two more weights whose rows follow `weight`'s in the output (no bias, gate or
    residual then). `gated`: the weight stacks two halves of N rows, for the SwiGLU gate or, with `conv_state`
    (`[1, N, KS]`) and `conv_weight` (`[N, KS]`), for BaseConv's conv gate. `chain`: may the kernel be chained
    (`chain_options`), i.e. read weights before the previous kernel ends."""
    K = x.shape[-1]
    N, out_dtype = _output_size_and_dtype(weight, more_weights, residual, gated)
    # The kernel reads x, the norm weight, bias and residual as dense vectors.
    x_row, norm_weight, bias = unit_stride(x).reshape(K), unit_stride(norm_weight), unit_stride(bias)
    residual = None if residual is None else unit_stride(residual).reshape(N)
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=out_dtype)
    NB = min(NORM_BLOCK, triton.next_power_of_2(K))
    if x.device.type != "cuda":
        (BN, PRE, BK), NB, launch = INTERPRETER, INTERPRETER[1], {}
    else:
        BN, PRE, BK, num_warps = TALL if (2 * N if gated else N) >= TALL_ROWS else SHORT
        PRE = min(PRE, triton.next_power_of_2(K))
        BN = max(1, BN // 2) if gated else BN  # a gated program reads its value rows and as many gate rows
        # One stage: the kernel double-buffers its weight tiles itself.
        launch = dict(num_warps=num_warps, num_stages=1)
    conv = conv_state is not None
    # Absent tensors are never read (their flags are off): x stands in for their pointers.
    state, taps = (conv_state[0], conv_weight) if conv else (x_row[:, None], x_row[:, None])
    w1, w2 = (more_weights * 2)[:2] if more_weights else (weight, weight)  # w2 is never read with one more
    _gemv_kernel[(triton.cdiv(N, BN),)](
        x_row, norm_weight if norm_weight is not None else x_row, weight, w1, w2, bias if bias is not None else x_row,
        residual if residual is not None else y, y, state, taps, N, weight.shape[0], w1.shape[0], K,
        weight.stride(0), w1.stride(0), w2.stride(0), norm_eps, taps.shape[1], *state.stride(), *taps.stride(),
        BN=BN, PRE=PRE, BK=BK, NB=NB, NORM=norm_weight is not None, STACKED=bool(more_weights), GATED=gated,
        CONV=conv, BKS=triton.next_power_of_2(taps.shape[1]),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, **launch,
        **(chain_options(x.device) if chain else dict(PDL=False)))
    return y


@_gemv_op.register_fake
def _(x, norm_weight, norm_eps, weight, more_weights, bias, residual, gated, conv_state, conv_weight, chain):
    N, out_dtype = _output_size_and_dtype(weight, more_weights, residual, gated)
    return x.new_empty(*x.shape[:-1], N, dtype=out_dtype)


def _output_size_and_dtype(weight, more_weights, residual, gated: bool) -> tuple[int, torch.dtype]:
    N = weight.shape[0] // 2 if gated else weight.shape[0] + sum(w.shape[0] for w in more_weights)
    return N, weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)


def _kernel_inputs(x, weights) -> tuple[list, bool]:
    """(weights with unit stride along their rows, whether the launch may be chained). A copy is written by a
    kernel just before the GEMV, so that GEMV must not read it early: it is not chained."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"the Triton linear kernel takes one row (x.numel() == in_features, a batch-1 decode "
                         f"step), got x of shape {tuple(x.shape)}; use backend='torch'")
    if all(w.stride(-1) == 1 for w in weights):
        return list(weights), True
    return [w.contiguous() for w in weights], False


def linear_triton(x, weight, bias, residual, gated: bool, norm_weight, norm_eps: float):
    """Same contract as `reference.linear_torch` for a single row of x (x.numel() == in_features)."""
    (weight,), chain = _kernel_inputs(x, [weight])
    return _gemv_op(x, norm_weight, norm_eps, weight, [], bias, residual, gated, None, None, chain)


def linear_gated_conv1d_step_triton(x, weight, bias, conv_state, conv_weight, norm_weight, norm_eps: float):
    """Same contract as `based.ops.short_conv.reference.linear_gated_conv1d_step_torch` for a single row of x, in
    the one launch of the in_proj's matrix-vector product."""
    (weight,), chain = _kernel_inputs(x, [weight])
    return _gemv_op(x, norm_weight, norm_eps, weight, [], bias, None, True, conv_state, conv_weight, chain)


def stacked_linear_triton(x, weights, norm_weight, norm_eps: float):
    """Same contract as `reference.stacked_linear_torch` for a single row of x and up to three weights, in one
    launch."""
    (first, *rest), chain = _kernel_inputs(x, weights)
    y = _gemv_op(x, norm_weight, norm_eps, first, rest, None, None, False, None, None, chain)
    return y.split([w.shape[0] for w in weights], dim=-1)
