"""Matrix-vector product for one token (batch-1 decoding), one Triton launch with the epilogue fused.

A batch-1 decode step is a chain of matrix-vector products, so it is bound by reading the weights. Each
program owns BN output rows, accumulates `w * x` elementwise in a [BN, BK] fp32 tile over K and reduces it
once at the end. The gate (`value * silu(gate)`, the value and gate rows read by the same program), bias and
residual add happen on the accumulator, so they cost no extra launch and no rounding in between.

Measured on an H200 inside Based-1.3B's batch-1 step (weights streamed from HBM): 159 launches read the 2.7 GB
in 1.45 ms, ~1.9 TB/s, the same GPU time as cuBLAS's GEMVs (1.25 ms, some with a split-K reduction) plus the
separate silu, multiply and residual-add kernels the fusion removes (0.2 ms). The configs below come from a
sweep that re-read the same matrix, i.e. from L2 (where 25.7 MB took 5.1 us against cuBLAS's 7.4): they
still need tuning with cold caches.

Inference only: `linear` uses the reference whenever a gradient is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# (rows per program, K per iteration, warps, stages), from the L2-resident sweep on an H200 (bf16): tall
# matrices did best with 16-row tiles pipelined 3 deep, short ones with 4 rows per program (more programs).
TALL = (16, 256, 4, 3)
SHORT = (4, 512, 4, 1)
TALL_ROWS = 4096
INTERPRETER = (4, 32)


@triton.jit
def _gemv_kernel(x, w, bias, residual, y, N, K, stride_w,
                 BN: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_acc = tl.zeros([BN, BK], dtype=tl.float32)
    b_acc_gate = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        m_w = m_n[:, None] & m_k[None, :]
        b_x = tl.load(x + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        p_w = w + o_n[:, None] * stride_w + o_k[None, :]
        b_acc += tl.load(p_w, mask=m_w, other=0.0).to(tl.float32) * b_x
        if GATED:  # the gate rows sit N rows below the value rows
            b_acc_gate += tl.load(p_w + N * stride_w, mask=m_w, other=0.0).to(tl.float32) * b_x
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
def _gemv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], gated: bool) -> Tensor:
    K = x.shape[-1]
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    x_row = x.reshape(K)
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=out_dtype)
    if x.device.type != "cuda":
        (BN, BK), launch = INTERPRETER, {}
    else:
        BN, BK, num_warps, num_stages = TALL if weight.shape[0] >= TALL_ROWS else SHORT
        BN = BN // 2 if gated else BN  # a gated program reads its value rows and as many gate rows
        launch = dict(num_warps=num_warps, num_stages=num_stages)
    _gemv_kernel[(triton.cdiv(N, BN),)](
        x_row, weight, bias if bias is not None else x_row, residual.reshape(N) if residual is not None else y,
        y, N, K, weight.stride(0), BN=BN, BK=BK, GATED=gated, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, **launch)
    return y


@_gemv_op.register_fake
def _(x, weight, bias, residual, gated):
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    out_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    return x.new_empty(*x.shape[:-1], N, dtype=out_dtype)


def linear_triton(x, weight, bias, residual, gated: bool):
    """Same contract as `reference.linear_torch` for a single row of x (x.numel() == in_features) and a
    weight with unit stride along its rows."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"the Triton linear kernel takes one row (x.numel() == in_features, a batch-1 decode "
                         f"step), got x of shape {tuple(x.shape)}; use backend='torch'")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return _gemv_op(x, weight, bias, residual, gated)
