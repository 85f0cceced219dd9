"""Triton backward of sliding-window attention.

With P the softmax probabilities (recomputed from q, k and the forward's lse) and delta_i = do_i . o_i:

    dv_j = sum_i P_ij do_i        dS_ij = P_ij (do_i . v_j - delta_i)
    dq_i = scale sum_j dS_ij k_j   dk_j = scale sum_i dS_ij q_i

The dq kernel runs first, one query block per program, and also writes delta; the dk/dv kernel then
takes one key block of one kv head per program and sums over every query head of its group, so no two
programs write the same gradient rows and no atomics are needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops.sliding_window.triton_common import (
    LOG2_E, BlockConfig, band_mask, head_columns, key_span, load_rows, mm, query_block, query_positions,
    store_rows,
)

# Launch shapes on GPUs (benchmarks/sliding_window.py --tune).
DQ_BLOCK_M, DQ_BLOCK_N, DQ_WARPS, DQ_STAGES = 64, 64, 4, 2
DKDV_BLOCK_M, DKDV_BLOCK_N, DKDV_WARPS, DKDV_STAGES = 64, 64, 4, 1


@triton.jit
def _probabilities(b_q, b_k, b_lse, p_m, m_m, o_n, Tk, window, scale_log2, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """P [BM, BN] of the queries (rows) over the keys (columns), 0 outside the band."""
    b_s = mm(b_q, tl.trans(b_k), DOT_DTYPE, PRECISION) * scale_log2
    return tl.where(band_mask(p_m, m_m, o_n, Tk, window), tl.exp2(b_s - b_lse[:, None]), 0.0)


@triton.jit(do_not_specialize=["Tq", "Tk", "window"])
def _dq_kernel(
    q, k, v, o, do, lse, delta, dq, Tq, Tk, window, scale_log2, scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq and delta of BM queries of one head."""
    i_b, i_h, i_hk, i_bh, o_m, m_m, p_m = query_block(Tq, Tk, H, G, BM)
    o_d, o_dv, m_d, m_dv = head_columns(D, DV, BD, BDV)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

    b_q = load_rows(q + i_b * stride_qb + i_h * stride_qh, o_m, m_m, stride_qt, o_d, m_d, stride_qd)
    b_do = load_rows(do + i_b * stride_dob + i_h * stride_doh, o_m, m_m, stride_dot, o_dv, m_dv, stride_dod)
    b_o = load_rows(o + i_b * stride_ob + i_h * stride_oh, o_m, m_m, stride_ot, o_dv, m_dv, stride_od)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    tl.store(delta + i_bh * Tq + o_m, b_delta, mask=m_m)
    b_lse = tl.load(lse + i_bh * Tq + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    first_pos, last_pos = query_positions(Tq, Tk, BM)
    lo, hi = key_span(first_pos, last_pos, window, BN)
    for j0 in range(lo, hi, BN):
        o_n = j0 + tl.arange(0, BN)
        m_n = o_n < Tk
        b_k = load_rows(p_k, o_n, m_n, stride_kt, o_d, m_d, stride_kd)
        b_v = load_rows(p_v, o_n, m_n, stride_vt, o_dv, m_dv, stride_vd)
        b_p = _probabilities(b_q, b_k, b_lse, p_m, m_m, o_n, Tk, window, scale_log2, DOT_DTYPE, PRECISION)
        b_ds = b_p * (mm(b_do, tl.trans(b_v), DOT_DTYPE, PRECISION) - b_delta[:, None])
        b_dq += mm(b_ds, b_k, DOT_DTYPE, PRECISION)
    store_rows(dq + i_b * stride_dqb + i_h * stride_dqh, b_dq * scale, o_m, m_m, stride_dqt, o_d, m_d, stride_dqd)


@triton.jit(do_not_specialize=["Tq", "Tk", "window"])
def _dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, Tq, Tk, window, scale_log2, scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk and dv of BN keys of one kv head, summed over the G query heads reading it."""
    i_n, i_bhk = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hk = i_bhk // Hkv, i_bhk % Hkv
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < Tk
    o_d, o_dv, m_d, m_dv = head_columns(D, DV, BD, BDV)
    b_k = load_rows(k + i_b * stride_kb + i_hk * stride_kh, o_n, m_n, stride_kt, o_d, m_d, stride_kd)
    b_v = load_rows(v + i_b * stride_vb + i_hk * stride_vh, o_n, m_n, stride_vt, o_dv, m_dv, stride_vd)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    # Queries whose windows reach these keys: positions i_n*BN .. last key + window - 1, as query indices.
    lo = tl.maximum(i_n * BN - (Tk - Tq), 0)
    lo = (lo // BM) * BM
    hi = tl.minimum(tl.minimum((i_n + 1) * BN, Tk) - 1 + window - (Tk - Tq), Tq - 1) + 1
    for g in range(G):
        i_h = i_hk * G + g
        i_bh = i_b * H + i_h
        p_q = q + i_b * stride_qb + i_h * stride_qh
        p_do = do + i_b * stride_dob + i_h * stride_doh
        for i0 in range(lo, hi, BM):
            o_m = i0 + tl.arange(0, BM)
            m_m = o_m < Tq
            b_q = load_rows(p_q, o_m, m_m, stride_qt, o_d, m_d, stride_qd)
            b_do = load_rows(p_do, o_m, m_m, stride_dot, o_dv, m_dv, stride_dod)
            b_lse = tl.load(lse + i_bh * Tq + o_m, mask=m_m, other=0.0)
            b_delta = tl.load(delta + i_bh * Tq + o_m, mask=m_m, other=0.0)
            b_p = _probabilities(b_q, b_k, b_lse, o_m + Tk - Tq, m_m, o_n, Tk, window, scale_log2, DOT_DTYPE,
                                 PRECISION)
            b_dv += mm(tl.trans(b_p), b_do, DOT_DTYPE, PRECISION)
            b_ds = b_p * (mm(b_do, tl.trans(b_v), DOT_DTYPE, PRECISION) - b_delta[:, None])
            b_dk += mm(tl.trans(b_ds), b_q, DOT_DTYPE, PRECISION)
    store_rows(dk + i_b * stride_dkb + i_hk * stride_dkh, b_dk * scale, o_n, m_n, stride_dkt, o_d, m_d, stride_dkd)
    store_rows(dv + i_b * stride_dvb + i_hk * stride_dvh, b_dv, o_n, m_n, stride_dvt, o_dv, m_dv, stride_dvd)


def backward(q, k, v, o, lse, do, window: int, scale: float):
    """dq, dk, dv (fresh contiguous tensors in the inputs' dtype) from the forward's o and lse."""
    B, Tq, H, D = q.shape
    Tk, Hkv, DV = k.shape[1], k.shape[2], v.shape[-1]
    window = min(window, Tk)
    shapes = dict(H=H, G=H // Hkv, D=D, DV=DV)
    delta = torch.empty(B * H, Tq, device=q.device, dtype=torch.float32)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    cfg = BlockConfig(q, k, v, DQ_BLOCK_M, DQ_BLOCK_N, DQ_WARPS, DQ_STAGES)
    _dq_kernel[(triton.cdiv(Tq, cfg.BM), B * H)](
        q, k, v, o, do, lse, delta, dq, Tq, Tk, window, scale * LOG2_E, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        BM=cfg.BM, BN=cfg.BN, BD=cfg.BD, BDV=cfg.BDV, DOT_DTYPE=cfg.DOT_DTYPE, PRECISION=cfg.PRECISION,
        **shapes, **cfg.launch)
    cfg = BlockConfig(q, k, v, DKDV_BLOCK_M, DKDV_BLOCK_N, DKDV_WARPS, DKDV_STAGES)
    _dkdv_kernel[(triton.cdiv(Tk, cfg.BN), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, Tq, Tk, window, scale * LOG2_E, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        BM=cfg.BM, BN=cfg.BN, BD=cfg.BD, BDV=cfg.BDV, DOT_DTYPE=cfg.DOT_DTYPE, PRECISION=cfg.PRECISION,
        **shapes, **cfg.launch)
    return dq, dk, dv
