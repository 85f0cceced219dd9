"""Triton forward of Taylor linear attention.

Inside the kernels the state is kept as *raw* sums over keys, one row per feature of the full
(unsymmetrised) map:

    row 0:             sum_j v_j                      (zeroth order)
    rows 1 .. DP:      sum_j k_j[a] v_j               (first order)
    rows 1+DP .. :     sum_j k_j[a] k_j[b] v_j        (second order, a-major, DP*DP rows)

with `z` the same sums with v replaced by 1 (the normaliser). With q pre-scaled by 1/sqrt(d), the score
of a key is 1 + q.k + (q.k)^2 / 2, so a query reads the state as `S0 + q @ S1 + (q x q) @ S2 / 2`: no feature
map is ever written to memory, and `state_layout.py` converts to the 153-feature public layout. The feature
dim d is zero-padded to DP (16 or 32) so every matrix product has K >= 16.

Work split: one program per (value block of BV columns, batch*head, segment of the sequence). A segment is
SEG chunks of BT tokens walked in order; segments run in parallel, each starting from the state of all
tokens before it (`_segment_state_kernel` sums each segment, a prefix sum over segments follows on the host).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_tile(ptr, o_t, m_t, stride_t, o_c, m_c, stride_c):
    """[len(o_t), len(o_c)] tile in float32; rows past T and padded columns read as 0."""
    return tl.load(ptr + o_t[:, None] * stride_t + o_c[None, :] * stride_c,
                   mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _outer_rows(b_x, BT: tl.constexpr, DP: tl.constexpr):
    """Per row, the flattened outer product x x^T: [BT, DP] -> [BT, DP*DP]."""
    return tl.reshape(b_x[:, :, None] * b_x[:, None, :], (BT, DP * DP))


@triton.jit
def _read_state(b_q, b_q2, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Numerator [BT, BV] and normaliser [BT] contributed by the state (keys before this chunk)."""
    b_num = b_s0[None, :] + tl.dot(b_q.to(DOT_DTYPE), b_s1.to(DOT_DTYPE), input_precision=PRECISION)
    b_num += 0.5 * tl.dot(b_q2.to(DOT_DTYPE), b_s2.to(DOT_DTYPE), input_precision=PRECISION)
    b_den = b_z0 + tl.sum(b_q * b_z1[None, :], 1) + 0.5 * tl.sum(b_q2 * b_z2[None, :], 1)
    return b_num, b_den


@triton.jit
def _add_chunk(b_k, b_v, b_s0, b_s1, b_s2, b_z1, b_z2, BT: tl.constexpr, DP: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Add one chunk of keys/values to the raw sums (padded rows are zero and add nothing)."""
    b_k2 = _outer_rows(b_k, BT, DP)
    b_vd = b_v.to(DOT_DTYPE)
    b_s0 += tl.sum(b_v, 0)
    b_s1 += tl.dot(tl.trans(b_k.to(DOT_DTYPE)), b_vd, input_precision=PRECISION)
    b_s2 += tl.dot(tl.trans(b_k2.to(DOT_DTYPE)), b_vd, input_precision=PRECISION)
    b_z1 += tl.sum(b_k, 0)
    b_z2 += tl.sum(b_k2, 0)
    return b_s0, b_s1, b_s2, b_z1, b_z2


@triton.jit
def _state_pointers(state, z, o_v, m_v, DV, DP: tl.constexpr):
    """Pointers and masks of the S0/S1/S2 rows and the z entries of one raw state [F, DV]."""
    o_d = tl.arange(0, DP)
    o_dd = tl.arange(0, DP * DP)
    p_s0 = state + o_v
    p_s1 = state + (1 + o_d)[:, None] * DV + o_v[None, :]
    p_s2 = state + (1 + DP + o_dd)[:, None] * DV + o_v[None, :]
    return p_s0, p_s1, p_s2, z, z + 1 + o_d, z + 1 + DP + o_dd, m_v[None, :]


@triton.jit
def _segment_state_kernel(
    k, v, seg_state, seg_z,
    T, DV, SEG, NS,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Raw sums of one segment's keys/values into seg_state[b*h, segment] (and seg_z, by value block 0)."""
    i_v, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_s0 = tl.zeros([BV], dtype=tl.float32)
    b_s1 = tl.zeros([DP, BV], dtype=tl.float32)
    b_s2 = tl.zeros([DP * DP, BV], dtype=tl.float32)
    b_z1 = tl.zeros([DP], dtype=tl.float32)
    b_z2 = tl.zeros([DP * DP], dtype=tl.float32)
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    t_start = i_s * SEG * BT
    t_end = tl.minimum(t_start + SEG * BT, T)
    for t0 in range(t_start, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_k = _load_tile(p_k, o_t, m_t, stride_kt, o_d, m_d, stride_kd)
        b_v = _load_tile(p_v, o_t, m_t, stride_vt, o_v, m_v, stride_vd)
        b_s0, b_s1, b_s2, b_z1, b_z2 = _add_chunk(b_k, b_v, b_s0, b_s1, b_s2, b_z1, b_z2, BT, DP,
                                                  DOT_DTYPE, PRECISION)
    F = 1 + DP + DP * DP
    p_s0, p_s1, p_s2, p_z0, p_z1, p_z2, m_sv = _state_pointers(
        seg_state + (i_bh * NS + i_s) * F * DV, seg_z + (i_bh * NS + i_s) * F, o_v, m_v, DV, DP)
    tl.store(p_s0, b_s0, mask=m_v)
    tl.store(p_s1, b_s1, mask=m_sv)
    tl.store(p_s2, b_s2, mask=m_sv)
    if i_v == 0:
        tl.store(p_z0, (t_end - t_start).to(tl.float32))
        tl.store(p_z1, b_z1)
        tl.store(p_z2, b_z2)


@triton.jit
def _forward_kernel(
    q, k, v, o, state_in, z_in, state_out, z_out,
    T, DV, SEG, NS, scale, eps, stride_in_bh, stride_in_s, stride_zin_bh, stride_zin_s,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, STORE_STATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Outputs of one segment, starting from state_in[b*h, segment] (all keys before the segment; for
    non-causal attention, all keys). With STORE_STATE the last segment writes the final raw state."""
    i_v, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    F = 1 + DP + DP * DP
    p_s0, p_s1, p_s2, p_z0, p_z1, p_z2, m_sv = _state_pointers(
        state_in + i_bh * stride_in_bh + i_s * stride_in_s, z_in + i_bh * stride_zin_bh + i_s * stride_zin_s,
        o_v, m_v, DV, DP)
    b_s0 = tl.load(p_s0, mask=m_v, other=0.0)
    b_s1 = tl.load(p_s1, mask=m_sv, other=0.0)
    b_s2 = tl.load(p_s2, mask=m_sv, other=0.0)
    b_z0 = tl.load(p_z0)
    b_z1 = tl.load(p_z1)
    b_z2 = tl.load(p_z2)

    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_h * stride_kh
    p_v = v + i_b * stride_vb + i_h * stride_vh
    p_o = o + i_b * stride_ob + i_h * stride_oh
    t_start = i_s * SEG * BT
    t_end = tl.minimum(t_start + SEG * BT, T)
    for t0 in range(t_start, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_q = _load_tile(p_q, o_t, m_t, stride_qt, o_d, m_d, stride_qd) * scale
        b_q2 = _outer_rows(b_q, BT, DP)
        b_num, b_den = _read_state(b_q, b_q2, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, DOT_DTYPE, PRECISION)
        if CAUSAL:
            b_k = _load_tile(p_k, o_t, m_t, stride_kt, o_d, m_d, stride_kd)
            b_v = _load_tile(p_v, o_t, m_t, stride_vt, o_v, m_v, stride_vd)
            # Scores inside the chunk, straight from q.k: 1 + s + s^2/2 on and below the diagonal.
            b_a = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=PRECISION)
            b_a = 1.0 + b_a + 0.5 * b_a * b_a
            b_a = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[None, :], b_a, 0.0)
            b_num += tl.dot(b_a.to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision=PRECISION)
            b_den += tl.sum(b_a, 1)
            b_s0, b_s1, b_s2, b_z1, b_z2 = _add_chunk(b_k, b_v, b_s0, b_s1, b_s2, b_z1, b_z2, BT, DP,
                                                      DOT_DTYPE, PRECISION)
            b_z0 += tl.sum(m_t.to(tl.float32), 0)
        if NORMALIZE:
            b_num = b_num / (b_den[:, None] + eps)
        tl.store(p_o + o_t[:, None] * stride_ot + o_v[None, :] * stride_od,
                 b_num.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

    if STORE_STATE:
        if i_s == NS - 1:
            p_s0, p_s1, p_s2, p_z0, p_z1, p_z2, m_sv = _state_pointers(
                state_out + i_bh * F * DV, z_out + i_bh * F, o_v, m_v, DV, DP)
            tl.store(p_s0, b_s0, mask=m_v)
            tl.store(p_s1, b_s1, mask=m_sv)
            tl.store(p_s2, b_s2, mask=m_sv)
            if i_v == 0:
                tl.store(p_z0, b_z0)
                tl.store(p_z1, b_z1)
                tl.store(p_z2, b_z2)


# ---- launch ------------------------------------------------------------------------------------------------

CHUNK = 64  # tokens per chunk (BT)


def padded_feature_dim(d: int) -> int:
    """DP: d zero-padded so that the kernels' matrix products have K >= 16."""
    if d > 16:
        raise ValueError(f"the Triton linear-attention kernels support feature dim d <= 16, got d={d}; "
                         "use backend='torch'")
    return 16


def raw_feature_count(dp: int) -> int:
    return 1 + dp + dp * dp


def dot_config(dtype, device):
    """(operand dtype, precision) of the kernels' matrix products: bf16 tensor cores for half inputs
    (fp16 too: state sums can overflow fp16's range), exact fp32 for fp32 inputs (tf32 would cost ~3e-4).

    Triton's CPU interpreter multiplies bf16 blocks wrongly (seen with Triton 3.9: errors of 1e10), so
    there every product runs in fp32.
    """
    import torch

    if dtype == torch.float32 or device.type != "cuda":
        return tl.float32, "ieee"
    return tl.bfloat16, "tf32"


def value_block(dv: int) -> int:
    return min(64, triton.next_power_of_2(dv))


def num_segments(n_chunks: int, programs_per_segment: int, device) -> int:
    """Split the sequence only as far as needed to give every SM about two programs: each extra segment
    costs one more pass over its keys/values and one more state in memory."""
    import torch

    if device.type != "cuda":
        return min(n_chunks, 2)  # the interpreter: exercise the segmented path on small inputs
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_chunks, -(-2 * sms // programs_per_segment)))


def forward(q, k, v, causal: bool, normalize: bool, eps: float, state0, z0, store_state: bool):
    """o and (when store_state) the final raw state/normaliser; state0/z0: raw initial state or None.

    q, k: [B, T, H, d]; v: [B, T, H, DV]; state0: [B, H, F, DV] fp32; z0: [B, H, F] fp32.
    """
    import torch

    B, T, H, D = q.shape
    DV = v.shape[-1]
    DP = padded_feature_dim(D)
    F = raw_feature_count(DP)
    BV = value_block(DV)
    n_vblocks = triton.cdiv(DV, BV)
    n_chunks = triton.cdiv(T, CHUNK)
    NS = num_segments(n_chunks, n_vblocks * B * H, q.device)
    SEG = triton.cdiv(n_chunks, NS)
    NS = triton.cdiv(n_chunks, SEG)
    dot_dtype, precision = dot_config(q.dtype, q.device)
    common = dict(H=H, D=D, DP=DP, BT=CHUNK, BV=BV, DOT_DTYPE=dot_dtype, PRECISION=precision)
    grid = (n_vblocks, B * H, NS)
    f32 = dict(device=q.device, dtype=torch.float32)
    if state0 is None:
        state0, z0 = torch.zeros(B, H, F, DV, **f32), torch.zeros(B, H, F, **f32)

    if causal and NS == 1:
        state_in, z_in = state0.reshape(B * H, 1, F, DV), z0.reshape(B * H, 1, F)
    else:
        seg_state = torch.empty(B * H, NS, F, DV, **f32)
        seg_z = torch.empty(B * H, NS, F, **f32)
        _segment_state_kernel[grid](k, v, seg_state, seg_z, T, DV, SEG, NS, *k.stride(), *v.stride(),
                                    **common)
        state0, z0 = state0.reshape(B * H, 1, F, DV), z0.reshape(B * H, 1, F)
        if causal:  # each segment starts from everything before it
            state_in = torch.cat([state0, seg_state[:, :-1]], 1).cumsum(1)
            z_in = torch.cat([z0, seg_z[:, :-1]], 1).cumsum(1)
        else:  # every segment reads the one total state
            state_in = (state0 + seg_state.sum(1, keepdim=True)).expand(-1, NS, -1, -1)
            z_in = (z0 + seg_z.sum(1, keepdim=True)).expand(-1, NS, -1)

    o = torch.empty(B, T, H, DV, device=q.device, dtype=v.dtype)
    store_in_kernel = store_state and causal
    state_out = torch.empty(B, H, F, DV, **f32) if store_in_kernel else state_in
    z_out = torch.empty(B, H, F, **f32) if store_in_kernel else z_in
    _forward_kernel[grid](
        q, k, v, o, state_in, z_in, state_out, z_out,
        T, DV, SEG, NS, D**-0.5, eps, state_in.stride(0), state_in.stride(1), z_in.stride(0), z_in.stride(1),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        CAUSAL=causal, NORMALIZE=normalize, STORE_STATE=store_in_kernel, **common)
    if not store_state:
        return o, None, None
    if not causal:  # the total state is already known
        state_out, z_out = state_in[:, 0].reshape(B, H, F, DV), z_in[:, 0].reshape(B, H, F)
    return o, state_out, z_out
