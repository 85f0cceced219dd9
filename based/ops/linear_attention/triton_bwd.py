"""Triton backward of Taylor linear attention.

With q scaled by 1/sqrt(d), a_ij = 1 + s_ij + s_ij^2/2, s_ij = q_i.k_j, and (when normalising)
g_i = do_i / den_i, w_i = -(do_i . o_i) / den_i (g_i = do_i, w_i = 0 otherwise):

    da_ij = g_i . v_j + w_i
    dq_i  = sum_{j <= i} da_ij (1 + s_ij) k_j            (forward scan over the key state S)
    dk_j  = sum_{i >= j} da_ij (1 + s_ij) q_i            (reverse scan over the query state R)
    dv_j  = sum_{i >= j} a_ij g_i

R is the forward's state with the roles swapped: rows x = q, u = g, w (triton_common.py), so both scans
reuse the forward's pieces. The gradient of the final state seeds R, and R after the whole reverse scan is
the gradient of the initial state. Value blocks split g.v_j, so dq and dk are summed over value blocks on
the host; dv is written per block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from based.ops.linear_attention.triton_common import (
    Launch, add_rows, grad_from_state, key_state_starts, load_state, load_tile, mm, outer_rows, program_coords,
    read_state, segment_span, segment_starts, store_state,
)


@triton.jit
def _load_output_grads(p_do, den, w, i_bh, T, o_t, m_t, stride_dt, o_v, m_v, stride_dd, BT: tl.constexpr,
                       NORMALIZE: tl.constexpr):
    """A chunk's g = do / den [BT, BV] and w [BT] (do and 0 without normalisation)."""
    b_g = load_tile(p_do, o_t, m_t, stride_dt, o_v, m_v, stride_dd)
    b_w = tl.zeros([BT], dtype=tl.float32)
    if NORMALIZE:
        b_g = b_g / tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)[:, None]
        b_w = tl.load(w + i_bh * T + o_t, mask=m_t, other=0.0)
    return b_g, b_w


@triton.jit(do_not_specialize=["T", "DV", "SEG"])
def _dq_kernel(
    q, k, v, do, den, w, dq, state_in, z_in,
    T, DV, SEG, scale, stride_in_bh, stride_in_s, stride_zin_bh, stride_zin_s,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_db, stride_dt, stride_dh, stride_dd,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of one segment and value block (a partial sum over value blocks), dq [NV, B*H, T, DP] fp32."""
    i_v, i_b, i_h, i_bh, i_s, o_v, m_v = program_coords(DV, H, BV)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_s0, b_s1, b_s2, b_z0, b_z1, b_z2 = load_state(
        state_in + i_bh * stride_in_bh + i_s * stride_in_s, z_in + i_bh * stride_zin_bh + i_s * stride_zin_s,
        o_v, m_v, DV, DP)
    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_do = do + i_b * stride_db + i_h * stride_dh
    p_dq = dq + (i_v * tl.num_programs(1) + i_bh) * T * DP
    t_start, t_end = segment_span(i_s, SEG, BT, T)
    for t0 in range(t_start, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_q = load_tile(p_q, o_t, m_t, stride_qt, o_d, m_d, stride_qd) * scale
        b_g, b_w = _load_output_grads(p_do, den, w, i_bh, T, o_t, m_t, stride_dt, o_v, m_v, stride_dd, BT,
                                      NORMALIZE)
        b_w = tl.where(i_v == 0, b_w, 0.0)  # w_i enters once, not once per value block
        b_dq = grad_from_state(b_q, b_g, b_w, b_s1, b_s2, b_z1, b_z2, BT, DP, DOT_DTYPE, PRECISION)
        if CAUSAL:
            b_k = load_tile(p_k, o_t, m_t, stride_kt, o_d, m_d, stride_kd)
            b_v = load_tile(p_v, o_t, m_t, stride_vt, o_v, m_v, stride_vd)
            b_s = mm(b_q, tl.trans(b_k), DOT_DTYPE, PRECISION)
            b_da = mm(b_g, tl.trans(b_v), DOT_DTYPE, PRECISION) + b_w[:, None]
            b_da = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[None, :], b_da * (1.0 + b_s), 0.0)
            b_dq += mm(b_da, b_k, DOT_DTYPE, PRECISION)
            b_s0, b_s1, b_s2, b_z0, b_z1, b_z2 = add_rows(b_k, b_v, m_t.to(tl.float32), b_s0, b_s1, b_s2,
                                                          b_z0, b_z1, b_z2, BT, DP, DOT_DTYPE, PRECISION)
        tl.store(p_dq + o_t[:, None] * DP + o_d[None, :], b_dq * scale, mask=m_t[:, None])


@triton.jit(do_not_specialize=["T", "DV", "SEG", "NS"])
def _dkdv_kernel(
    q, k, v, do, den, w, dk, dv, r_in, y_in, r_out, y_out,
    T, DV, SEG, NS, scale, stride_in_bh, stride_in_s, stride_yin_bh, stride_yin_s,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_db, stride_dt, stride_dh, stride_dd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, STORE_STATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dv and a value block's part of dk for one segment, walking its chunks last to first from
    r_in[b*h, segment] = the query state of everything after the segment (all queries when not causal).
    With STORE_STATE, segment 0 writes the query state of the whole sequence (the initial state's grad)."""
    i_v, i_b, i_h, i_bh, i_s, o_v, m_v = program_coords(DV, H, BV)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_r0, b_r1, b_r2, b_y0, b_y1, b_y2 = load_state(
        r_in + i_bh * stride_in_bh + i_s * stride_in_s, y_in + i_bh * stride_yin_bh + i_s * stride_yin_s,
        o_v, m_v, DV, DP)
    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_do = do + i_b * stride_db + i_h * stride_dh
    p_dv = dv + i_b * stride_dvb + i_h * stride_dvh
    p_dk = dk + (i_v * tl.num_programs(1) + i_bh) * T * DP
    first_chunk = i_s * SEG
    n_chunks = tl.minimum(SEG, tl.cdiv(T, BT) - first_chunk)
    for c in range(n_chunks):
        o_t = (first_chunk + n_chunks - 1 - c) * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_k = load_tile(p_k, o_t, m_t, stride_kt, o_d, m_d, stride_kd)
        b_v = load_tile(p_v, o_t, m_t, stride_vt, o_v, m_v, stride_vd)
        b_key_w = tl.where(i_v == 0, m_t.to(tl.float32), 0.0)  # w-weighted sums enter once, not per value block
        # Queries after this chunk, through the state.
        b_dv, _ = read_state(b_k, outer_rows(b_k, BT, DP), b_r0, b_r1, b_r2, b_y0, b_y1, b_y2,
                             DOT_DTYPE, PRECISION)
        b_dk = grad_from_state(b_k, b_v, b_key_w, b_r1, b_r2, b_y1, b_y2, BT, DP, DOT_DTYPE, PRECISION)
        if CAUSAL:
            b_q = load_tile(p_q, o_t, m_t, stride_qt, o_d, m_d, stride_qd) * scale
            b_g, b_w = _load_output_grads(p_do, den, w, i_bh, T, o_t, m_t, stride_dt, o_v, m_v, stride_dd, BT,
                                          NORMALIZE)
            # Queries of this chunk: [i, j] = (query i, key j), kept where i >= j.
            m_causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]
            b_s = mm(b_q, tl.trans(b_k), DOT_DTYPE, PRECISION)
            b_a = tl.where(m_causal, 1.0 + b_s + 0.5 * b_s * b_s, 0.0)
            b_dv += mm(tl.trans(b_a), b_g, DOT_DTYPE, PRECISION)
            b_da = mm(b_g, tl.trans(b_v), DOT_DTYPE, PRECISION) + tl.where(i_v == 0, b_w, 0.0)[:, None]
            b_da = tl.where(m_causal, b_da * (1.0 + b_s), 0.0)
            b_dk += mm(tl.trans(b_da), b_q, DOT_DTYPE, PRECISION)
            b_r0, b_r1, b_r2, b_y0, b_y1, b_y2 = add_rows(b_q, b_g, b_w, b_r0, b_r1, b_r2, b_y0, b_y1, b_y2,
                                                          BT, DP, DOT_DTYPE, PRECISION)
        tl.store(p_dv + o_t[:, None] * stride_dvt + o_v[None, :] * stride_dvd,
                 b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        tl.store(p_dk + o_t[:, None] * DP + o_d[None, :], b_dk, mask=m_t[:, None])

    if STORE_STATE:
        if i_s == 0:
            F = 1 + DP + DP * DP
            store_state(r_out + i_bh * F * DV, y_out + i_bh * F, o_v, m_v, DV, DP,
                        b_r0, b_r1, b_r2, b_y0, b_y1, b_y2, i_v == 0)


def _query_state_seed(d_state, d_z, launch: Launch):
    """R (raw query sums) equivalent to a gradient on the final raw state: zeroth and first order as they
    are, second order 2 * sym(dS2), since a query reads S2 with a factor 1/2 and k k^T is symmetric."""
    BH, F, DP = launch.B * launch.H, launch.F, launch.DP

    def seed(x, tail):
        # A fresh row-major copy: the kernels address each state as a dense [F, DV] block, and autograd
        # hands over gradients in whatever layout the consumer produced.
        x = x.reshape(BH, F, *tail).clone(memory_format=torch.contiguous_format)
        second = x[:, 1 + DP:].reshape(BH, DP, DP, *tail)
        x[:, 1 + DP:] = (second + second.transpose(1, 2)).reshape(BH, DP * DP, *tail)
        return x[:, None]

    return seed(d_state, (launch.DV,)), seed(d_z, ())


def backward(q, k, v, o, do, den, state0, z0, d_state, d_z, causal: bool, normalize: bool,
             need_d_state0: bool):
    """Gradients of q, k, v and (when need_d_state0) of the raw initial state and z.

    den: the forward's normaliser [B*H, T] (None without normalisation); state0 / z0: the raw initial
    state or None; d_state / d_z: gradient of the final raw state ([B, H, F, DV] / [B, H, F]) or None.
    """
    launch = Launch(q, v)
    state_in, z_in = key_state_starts(launch, k, v, state0, z0, causal)
    B, T, H, D, DV, F, DP = launch.B, launch.T, launch.H, launch.D, launch.DV, launch.F, launch.DP
    scale = D**-0.5
    f32 = dict(device=q.device, dtype=torch.float32)
    w = None
    if normalize:
        # Row-major [B*H, T] like den (the kernels index both so); the division keeps its operand's layout.
        w = (-(do.float() * o.float()).sum(-1).transpose(1, 2).reshape(B * H, T) / den).contiguous()
    den_arg = den if normalize else q
    w_arg = w if normalize else q
    kernel_args = dict(CAUSAL=causal, NORMALIZE=normalize, **launch.constexprs)

    dq = torch.empty(launch.n_vblocks, B * H, T, DP, **f32)
    _dq_kernel[launch.grid](
        q, k, v, do, den_arg, w_arg, dq, state_in, z_in, T, DV, launch.SEG, scale,
        state_in.stride(0), state_in.stride(1), z_in.stride(0), z_in.stride(1),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), **kernel_args)

    if d_state is None:
        r_init, y_init = launch.zeros_state(q.device)
    else:
        r_init, y_init = _query_state_seed(d_state, d_z, launch)
    if causal and launch.NS == 1:
        r_in, y_in = r_init, y_init
    else:
        # The backward's rows: x = q / sqrt(d), u = do / den, w; the den / w views are [B, T, H]-strided.
        den_v = den.reshape(B, H, T).transpose(1, 2) if normalize else None
        w_v = w.reshape(B, H, T).transpose(1, 2) if normalize else None
        seg_r, seg_y = launch.segment_sums(q, do, scale, den_v, w_v, count_rows=False)
        r_in = segment_starts(r_init, seg_r, causal, reverse=True)
        y_in = segment_starts(y_init, seg_y, causal, reverse=True)

    dk = torch.empty(launch.n_vblocks, B * H, T, DP, **f32)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    store = need_d_state0 and causal
    r_out = torch.empty(B * H, F, DV, **f32) if store else r_in
    y_out = torch.empty(B * H, F, **f32) if store else y_in
    _dkdv_kernel[launch.grid](
        q, k, v, do, den_arg, w_arg, dk, dv, r_in, y_in, r_out, y_out,
        T, DV, launch.SEG, launch.NS, scale, r_in.stride(0), r_in.stride(1), y_in.stride(0), y_in.stride(1),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dv.stride(), STORE_STATE=store, **kernel_args)

    def per_head(x):  # [NV, B*H, T, DP] partial sums -> [B, T, H, D]
        return x.sum(0).reshape(B, H, T, DP)[..., :D].transpose(1, 2)

    d_state0 = None
    if need_d_state0:
        r, y = (r_out, y_out) if causal else (r_in[:, 0], y_in[:, 0])
        # R holds raw query sums; the initial state's gradient reads S2 with the queries' factor 1/2.
        d_state0 = tuple(_halve_second_order(x.reshape(B, H, F, *x.shape[2:]), DP) for x in (r, y))
    # Fresh contiguous gradients whatever the inputs' layout (the op's fake promises that to torch.compile).
    return per_head(dq).to(q.dtype).contiguous(), per_head(dk).to(k.dtype).contiguous(), dv, d_state0


def _halve_second_order(x, dp):
    x = x.clone(memory_format=torch.contiguous_format)
    x[:, :, 1 + dp:] *= 0.5
    return x
