"""Triton decode step of sliding-window attention over the ring-buffer cache (`cache.py`), one launch.

One program per (batch, kv head) serves the G query heads that read it. Slot pos % W of the ring still holds
the token that leaves the window, so the program attends over the new token (its key and value taken from
registers) and the W - 1 other slots, then overwrites that slot with the new key and value. Slots past `pos`
are not written yet before the ring fills and are masked. All arithmetic is fp32 with 2D tiles (a [slots, D]
block of keys against one query row): the step moves W keys and values per head and is bound by memory.

The kernel is compiled without FMA contraction. Each sum is a butterfly across threads, and the threads that
hold copies of one reduced value must round alike: they all write it to the same shared-memory word on the way
to the next stage. With a product fused into the first addition each thread rounds a different pair, the
copies differ in the last bit, and that is a write-write race (compute-sanitizer's racecheck reports it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops._backend import decode_launch
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel
from based.ops.sliding_window.triton_common import LOG2_E, load_rows

# Slots per block and warps (measurements: docs/PERFORMANCE.md). With enough programs to fill the SMs the step
# streams the cache, and small blocks on few warps keep more of it in flight; when the programs do not fill the
# SMs (batch 1) it is latency-bound, and one big block on 8 warps issues every load at once.
MANY_PROGRAMS = (64, 2)
FEW_PROGRAMS = (128, 8)
INTERPRETER_SLOTS = 16


@triton.jit
def _decode_kernel(
    q, k, v, cache_k, cache_v, o, pos_ptr, pos_value, W, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_ckb, stride_ckw, stride_ckh, stride_ckd,
    stride_cvb, stride_cvw, stride_cvh, stride_cvd,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BW: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, POS_ON_DEVICE: tl.constexpr, PDL: tl.constexpr,
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    i_bhk = tl.program_id(0)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    pos = tl.load(pos_ptr) if POS_ON_DEVICE else pos_value
    slot = pos % W
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    b_k_new = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_v_new = tl.load(v + i_b * stride_vb + i_hk * stride_vh + o_dv, mask=m_dv, other=0.0).to(tl.float32)
    p_ck = cache_k + i_b * stride_ckb + i_hk * stride_ckh
    p_cv = cache_v + i_b * stride_cvb + i_hk * stride_cvh
    # The G query heads of a kv head one after another: their second reads of the keys hit the cache.
    for g in tl.static_range(G):
        i_h = i_hk * G + g
        b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
        # The new token starts the online softmax: running max = its score, sum = 1, accumulator = its value.
        b_max = tl.sum(b_q * b_k_new, 0) * scale_log2
        b_sum = tl.full([], 1.0, tl.float32)
        b_acc = b_v_new
        for i0 in range(0, W - 1, BW):
            o_i = i0 + tl.arange(0, BW)
            o_w = o_i + (o_i >= slot).to(tl.int32)  # the ring slots other than the one being overwritten
            m_w = (o_i < W - 1) & (o_w < pos)  # before the ring fills, only slots below pos hold tokens
            b_k = load_rows(p_ck, o_w, m_w, stride_ckw, o_d, m_d, stride_ckd).to(tl.float32)
            b_v = load_rows(p_cv, o_w, m_w, stride_cvw, o_dv, m_dv, stride_cvd).to(tl.float32)
            b_s = tl.where(m_w, tl.sum(b_k * b_q[None, :], 1) * scale_log2, float("-inf"))
            b_new_max = tl.maximum(b_max, tl.max(b_s, 0))
            b_p = tl.exp2(b_s - b_new_max)
            b_alpha = tl.exp2(b_max - b_new_max)
            b_sum = b_sum * b_alpha + tl.sum(b_p, 0)
            b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, 0)
            b_max = b_new_max
        tl.store(o + i_b * stride_ob + i_h * stride_oh + o_dv, (b_acc / b_sum).to(o.dtype.element_ty), mask=m_dv)
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
    BW, launch = decode_launch(q.device, B * Hkv, FEW_PROGRAMS, MANY_PROGRAMS, INTERPRETER_SLOTS)
    _decode_kernel[(B * Hkv,)](
        q, k, v, cache_k, cache_v, o, pos if on_device else q, 0 if on_device else pos, W, scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        *cache_k.stride(), *cache_v.stride(),
        HKV=Hkv, G=H // Hkv, D=D, DV=DV, BW=BW, BD=triton.next_power_of_2(D), BDV=triton.next_power_of_2(DV),
        POS_ON_DEVICE=on_device, enable_fp_fusion=False, **launch)
    return o
