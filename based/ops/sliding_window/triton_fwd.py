"""Triton forward of sliding-window attention (layouts and work split: `triton_common.py`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops.sliding_window.triton_common import (
    LOG2_E, BlockConfig, head_columns, key_span, load_rows, mm, query_block, query_positions, store_rows,
)

# Launch shape on GPUs (benchmarks/sliding_window.py --tune): queries and keys per block, warps, stages, and
# a register cap. The cap keeps the kernel at four resident programs per SM: uncapped, Triton takes just over
# 128 registers, where only three fit (docs/PERFORMANCE.md).
FWD_BLOCK_M, FWD_BLOCK_N, FWD_WARPS, FWD_STAGES, FWD_MAX_REGISTERS = 64, 64, 4, 3, 120


@triton.jit(do_not_specialize=["Tq", "Tk", "window"])
def _forward_kernel(
    q, k, v, o, lse, Tq, Tk, window, scale_log2,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """o and lse of BM queries of one head: an online softmax over the key blocks meeting their band."""
    i_b, i_h, i_hk, i_bh, o_m, m_m, p_m = query_block(Tq, Tk, H, G, BM)
    o_d, o_dv, m_d, m_dv = head_columns(D, DV, BD, BDV)
    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

    # Scores in base 2: scale * log2(e) folded into q once, not into every score block.
    b_q = (load_rows(p_q, o_m, m_m, stride_qt, o_d, m_d, stride_qd).to(tl.float32) * scale_log2).to(DOT_DTYPE)
    # A finite floor for the running max: a row that has seen no key yet gets exp2(-inf - floor) = 0 and a
    # rescale of exp2(0) = 1 on empty sums, with no special case.
    b_max = tl.full([BM], -1e30, dtype=tl.float32)
    b_sum = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BDV], dtype=tl.float32)
    first_pos, last_pos = query_positions(Tq, Tk, BM)
    lo, hi = key_span(first_pos, last_pos, window, BN)
    for j0 in range(lo, hi, BN):
        o_n = j0 + tl.arange(0, BN)
        m_n = o_n < Tk
        b_k = load_rows(p_k, o_n, m_n, stride_kt, o_d, m_d, stride_kd)
        b_s = mm(b_q, tl.trans(b_k), DOT_DTYPE, PRECISION)
        # Only blocks crossing an edge of the band need the mask. Keys past Tk need none (a real query's
        # p < Tk), and rows past Tq are never stored.
        if (j0 + BN - 1 > first_pos) | (j0 <= last_pos - window):
            b_d = p_m[:, None] - o_n[None, :]
            b_s = tl.where((b_d >= 0) & (b_d < window), b_s, float("-inf"))
        b_new_max = tl.maximum(b_max, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_new_max[:, None])
        b_alpha = tl.exp2(b_max - b_new_max)
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_v = load_rows(p_v, o_n, m_n, stride_vt, o_dv, m_dv, stride_vd)
        b_acc = b_acc * b_alpha[:, None] + mm(b_p, b_v, DOT_DTYPE, PRECISION)
        b_max = b_new_max
    # Every real query sees at least its own key, so b_sum > 0 on the rows that are stored.
    store_rows(o + i_b * stride_ob + i_h * stride_oh, b_acc / b_sum[:, None], o_m, m_m, stride_ot, o_dv, m_dv,
               stride_od)
    tl.store(lse + i_bh * Tq + o_m, b_max + tl.log2(b_sum), mask=m_m)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float):
    """o `[B, Tq, H, DV]` in q's dtype and lse `[B*H, Tq]` fp32 (base 2, scores scaled by scale*log2(e))."""
    B, Tq, H, D = q.shape
    Tk, Hkv, DV = k.shape[1], k.shape[2], v.shape[-1]
    cfg = BlockConfig(q, k, v, FWD_BLOCK_M, FWD_BLOCK_N, FWD_WARPS, FWD_STAGES, FWD_MAX_REGISTERS)
    o = torch.empty(B, Tq, H, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, Tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, cfg.BM), B * H)
    _forward_kernel[grid](
        q, k, v, o, lse, Tq, Tk, min(window, Tk), scale * LOG2_E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H=H, G=H // Hkv, D=D, DV=DV, BM=cfg.BM, BN=cfg.BN, BD=cfg.BD, BDV=cfg.BDV,
        DOT_DTYPE=cfg.DOT_DTYPE, PRECISION=cfg.PRECISION, **cfg.launch)
    return o, lse
