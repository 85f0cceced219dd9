"""Triton decode step of sliding-window attention over the ring-buffer cache (`cache.py`), one launch.

One program per (batch, kv head) serves the G query heads that read it: it attends over the W slots,
taking the new token's key and value from registers for slot pos % W (so it never reads back its own
write), then stores them into that slot. Slots past `pos` are not written yet before the ring fills and
are masked. All arithmetic is fp32: the step moves W keys and values per head and is bound by memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops.sliding_window.triton_common import LOG2_E, load_rows

SLOTS_PER_BLOCK = 64
NUM_WARPS = 4
MAX_TILE = 8192  # elements of the [BG, BW, BD] product tile


@triton.jit
def _decode_kernel(
    q, k, v, cache_k, cache_v, o, pos_ptr, pos_value, W, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_ckb, stride_ckw, stride_ckh, stride_ckd,
    stride_cvb, stride_cvw, stride_cvh, stride_cvd,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BG: tl.constexpr, BW: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, POS_ON_DEVICE: tl.constexpr,
):
    i_bhk = tl.program_id(0)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    pos = tl.load(pos_ptr) if POS_ON_DEVICE else pos_value
    slot = pos % W
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    # The G query heads of this kv head are consecutive: rows of one [BG, BD] tile.
    b_q = load_rows(q + i_b * stride_qb + i_hk * G * stride_qh, o_g, m_g, stride_qh, o_d, m_d, 1).to(tl.float32)
    b_k_new = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_v_new = tl.load(v + i_b * stride_vb + i_hk * stride_vh + o_dv, mask=m_dv, other=0.0).to(tl.float32)
    p_ck = cache_k + i_b * stride_ckb + i_hk * stride_ckh
    p_cv = cache_v + i_b * stride_cvb + i_hk * stride_cvh

    b_max = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BDV], dtype=tl.float32)
    for w0 in range(0, W, BW):
        o_w = w0 + tl.arange(0, BW)
        # Before the ring has filled (pos < W - 1) only slots 0..pos hold tokens.
        m_w = (o_w < W) & (o_w <= pos)
        is_new = (o_w == slot)[:, None]
        b_k = tl.where(is_new, b_k_new[None, :], load_rows(p_ck, o_w, m_w, stride_ckw, o_d, m_d, stride_ckd))
        b_v = tl.where(is_new, b_v_new[None, :], load_rows(p_cv, o_w, m_w, stride_cvw, o_dv, m_dv, stride_cvd))
        # [BG, BW] scores as broadcast products: G and W are too small for the matrix units to pay.
        b_s = tl.sum(b_q[:, None, :] * b_k.to(tl.float32)[None, :, :], 2) * scale_log2
        b_s = tl.where(m_w[None, :], b_s, float("-inf"))
        b_new_max = tl.maximum(b_max, tl.max(b_s, 1))  # finite: slot 0 is always valid
        b_p = tl.exp2(b_s - b_new_max[:, None])
        b_alpha = tl.exp2(b_max - b_new_max)
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.sum(b_p[:, :, None] * b_v.to(tl.float32)[None, :, :], 1)
        b_max = b_new_max
    b_o = b_acc / b_sum[:, None]
    tl.store(o + i_b * stride_ob + (i_hk * G + o_g)[:, None] * stride_oh + o_dv[None, :],
             b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_dv[None, :])
    tl.store(p_ck + slot * stride_ckw + o_d * stride_ckd, b_k_new.to(cache_k.dtype.element_ty), mask=m_d)
    tl.store(p_cv + slot * stride_cvw + o_dv * stride_cvd, b_v_new.to(cache_v.dtype.element_ty), mask=m_dv)


def decode_step(q, k, v, cache_k, cache_v, pos, scale: float) -> torch.Tensor:
    """o `[B, H, DV]`; writes k, v into slot pos % W of the cache. q `[B, H, D]`, k `[B, Hkv, D]`,
    v `[B, Hkv, DV]` with unit stride along the head dim; pos an int or a 0-dim int64 device tensor."""
    B, H, D = q.shape
    Hkv, DV, W = k.shape[1], v.shape[-1], cache_k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o = torch.empty(B, H, DV, device=q.device, dtype=q.dtype)
    on_device = isinstance(pos, torch.Tensor)
    G = H // Hkv
    BD, BDV = triton.next_power_of_2(D), triton.next_power_of_2(DV)
    BG = triton.next_power_of_2(G)
    # Keep the [BG, BW, BD] product within a few thousand registers' worth of elements.
    BW = max(1, min(SLOTS_PER_BLOCK, triton.next_power_of_2(W), MAX_TILE // (BG * max(BD, BDV))))
    _decode_kernel[(B * Hkv,)](
        q, k, v, cache_k, cache_v, o, pos if on_device else q, 0 if on_device else pos, W, scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        *cache_k.stride(), *cache_v.stride(),
        HKV=Hkv, G=G, D=D, DV=DV, BG=BG, BW=BW, BD=BD, BDV=BDV, POS_ON_DEVICE=on_device,
        **({} if q.device.type != "cuda" else dict(num_warps=NUM_WARPS)))
    return o
