"""Triton forward of Taylor linear attention (state layout and work split: `triton_common.py`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops.linear_attention.triton_common import (
    Launch, add_rows, key_state_starts, load_state, load_tile, mm, outer_rows, program_coords, read_state,
    segment_span, store_state,
)


@triton.jit(do_not_specialize=["T", "DV", "SEG", "NS"])
def _forward_kernel(
    q, k, v, o, den, state_in, z_in, state_out, z_out,
    T, DV, SEG, NS, scale, eps, stride_in_bh, stride_in_s, stride_zin_bh, stride_zin_s,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, STORE_STATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Outputs of one segment, from state_in[b*h, segment] = all keys before the segment (all keys when
    not causal). Writes the normaliser (den [B*H, T], eps included) for the backward, and with
    STORE_STATE the last segment writes the final raw state."""
    i_v, i_b, i_h, i_bh, i_s, o_v, m_v = program_coords(DV, H, BV)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_s0, b_s1, b_s2, b_z0, b_z1, b_z2 = load_state(
        state_in + i_bh * stride_in_bh + i_s * stride_in_s, z_in + i_bh * stride_zin_bh + i_s * stride_zin_s,
        o_v, m_v, DV, DP)

    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_o = o + i_b * stride_ob + i_h * stride_oh
    t_start, t_end = segment_span(i_s, SEG, BT, T)
    for t0 in range(t_start, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_q = load_tile(p_q, o_t, m_t, stride_qt, o_d, m_d, stride_qd) * scale
        b_num, b_den = read_state(b_q, outer_rows(b_q, BT, DP), b_s0, b_s1, b_s2, b_z0, b_z1, b_z2,
                                  DOT_DTYPE, PRECISION)
        if CAUSAL:
            b_k = load_tile(p_k, o_t, m_t, stride_kt, o_d, m_d, stride_kd)
            b_v = load_tile(p_v, o_t, m_t, stride_vt, o_v, m_v, stride_vd)
            # Scores inside the chunk, straight from q.k: 1 + s + s^2/2 on and below the diagonal.
            b_a = mm(b_q, tl.trans(b_k), DOT_DTYPE, PRECISION)
            b_a = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[None, :], 1.0 + b_a + 0.5 * b_a * b_a, 0.0)
            b_num += mm(b_a, b_v, DOT_DTYPE, PRECISION)
            b_den += tl.sum(b_a, 1)
            b_s0, b_s1, b_s2, b_z0, b_z1, b_z2 = add_rows(b_k, b_v, m_t.to(tl.float32), b_s0, b_s1, b_s2,
                                                          b_z0, b_z1, b_z2, BT, DP, DOT_DTYPE, PRECISION)
        if NORMALIZE:
            b_den += eps
            b_num = b_num / b_den[:, None]
            if i_v == 0:
                tl.store(den + i_bh * T + o_t, b_den, mask=m_t)
        tl.store(p_o + o_t[:, None] * stride_ot + o_v[None, :] * stride_od,
                 b_num.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

    if STORE_STATE:
        if i_s == NS - 1:
            F = 1 + DP + DP * DP
            store_state(state_out + i_bh * F * DV, z_out + i_bh * F, o_v, m_v, DV, DP,
                        b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, i_v == 0)


def forward(q, k, v, causal: bool, normalize: bool, eps: float, state0, z0, store_state: bool):
    """Run the forward.

    q, k: [B, T, H, d]; v: [B, T, H, DV]; state0 / z0: raw initial state [B, H, F, DV] / [B, H, F] fp32,
    or None. Returns (o, den [B*H, T] fp32 or None, final raw state and z ([B, H, F, DV], [B, H, F]) or None).
    """
    launch = Launch(q, v)
    B, T, H, DV, F = launch.B, launch.T, launch.H, launch.DV, launch.F
    state_in, z_in = key_state_starts(launch, k, v, state0, z0, causal)

    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, DV, device=q.device, dtype=v.dtype)
    den = torch.empty(B * H, T, **f32) if normalize else None
    store_in_kernel = store_state and causal
    state_out = torch.empty(B, H, F, DV, **f32) if store_in_kernel else state_in
    z_out = torch.empty(B, H, F, **f32) if store_in_kernel else z_in
    _forward_kernel[launch.grid](
        q, k, v, o, den if normalize else o, state_in, z_in, state_out, z_out,
        T, DV, launch.SEG, launch.NS, launch.D**-0.5, eps,
        state_in.stride(0), state_in.stride(1), z_in.stride(0), z_in.stride(1),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        CAUSAL=causal, NORMALIZE=normalize, STORE_STATE=store_in_kernel, **launch.constexprs)
    final = None
    if store_state:
        # Non-causal: every segment started from the total, which is the final state.
        final = (state_out, z_out) if causal else (state_in[:, 0].reshape(B, H, F, DV), z_in[:, 0].reshape(B, H, F))
    return o, den, final

