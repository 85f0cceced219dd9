"""Pieces shared by the Triton forward and backward of Taylor linear attention.

Inside the kernels a state is kept as *raw* sums, one row per feature of the full (unsymmetrised) map:

    row 0:             sum_j u_j                      (zeroth order)
    rows 1 .. DP:      sum_j x_j[a] u_j               (first order)
    rows 1+DP .. :     sum_j x_j[a] x_j[b] u_j        (second order, a-major, DP*DP rows)

plus `z`, the same sums with u_j replaced by a per-row weight w_j. In the forward x = k, u = v, w = 1
(z is the normaliser); the backward's reverse scan uses x = q/sqrt(d), u = do/den, w = -(do.o)/den.
With q pre-scaled by 1/sqrt(d), the score of a key is 1 + q.k + (q.k)^2 / 2, so a query reads a state as
`S0 + q @ S1 + (q x q) @ S2 / 2`: no feature map is ever written to memory, and `state_layout.py`
converts to the 153-feature public layout. The feature dim d is zero-padded to DP = 16 so that every
matrix product has K >= 16.

Work split: one program per (value block of BV columns, batch*head, segment of the sequence). A segment is
SEG chunks of BT tokens walked in order; segments run in parallel, each starting from the state of the
tokens before it (after it, in the backward's reverse scan), which `segment_sums` + a prefix sum provide.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shape (benchmarks/tune_linear_attention.py): tokens per chunk, value columns per program, warps.
# A chunk's second-order features [BT, DP*DP] and the state [DP*DP, BV] live in registers, so BT * 256 and
# 256 * BV bound what fits before the compiler spills.
# BT=16, BV=32 is the best of that sweep (docs/PERFORMANCE.md).
CHUNK = 16
BLOCK_V = 32
NUM_WARPS = 4


@triton.jit
def program_coords(DV, H: tl.constexpr, BV: tl.constexpr):
    """This program's value block, batch, head, batch*head and segment, its value columns and their mask."""
    i_v, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_v = i_v * BV + tl.arange(0, BV)
    return i_v, i_bh // H, i_bh % H, i_bh, i_s, o_v, o_v < DV


@triton.jit
def segment_span(i_s, SEG, BT: tl.constexpr, T):
    """First token of segment i_s and one past its last."""
    t_start = i_s * SEG * BT
    return t_start, tl.minimum(t_start + SEG * BT, T)


@triton.jit
def load_tile(ptr, o_t, m_t, stride_t, o_c, m_c, stride_c):
    """[len(o_t), len(o_c)] tile in float32; rows past T and padded columns read as 0."""
    return tl.load(ptr + o_t[:, None] * stride_t + o_c[None, :] * stride_c,
                   mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def outer_rows(b_x, BT: tl.constexpr, DP: tl.constexpr):
    """Per row, the flattened outer product x x^T: [BT, DP] -> [BT, DP*DP], index a*DP + b."""
    return tl.reshape(b_x[:, :, None] * b_x[:, None, :], (BT, DP * DP))


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def read_state(b_x, b_x2, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """sum_j a(x, x_j) u_j [BT, BV] and sum_j a(x, x_j) w_j [BT] over the rows summed in a state,
    a(x, y) = 1 + x.y + (x.y)^2 / 2."""
    b_num = b_s0[None, :] + mm(b_x, b_s1, DOT_DTYPE, PRECISION) + 0.5 * mm(b_x2, b_s2, DOT_DTYPE, PRECISION)
    b_den = b_z0 + tl.sum(b_x * b_z1[None, :], 1) + 0.5 * tl.sum(b_x2 * b_z2[None, :], 1)
    return b_num, b_den


@triton.jit
def grad_from_state(b_x, b_u, b_w, b_s1, b_s2, b_z1, b_z2, BT: tl.constexpr, DP: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """d/dx of sum_j (u.u_j + w w_j) a(x, x_j) over the rows summed in a state, [BT, DP]:
    S1 u + Z1 w + sum_b x_b (S2[b, :] u + Z2[b, :] w)."""
    b_g = mm(b_u, tl.trans(b_s1), DOT_DTYPE, PRECISION) + b_w[:, None] * b_z1[None, :]
    b_m = mm(b_u, tl.trans(b_s2), DOT_DTYPE, PRECISION) + b_w[:, None] * b_z2[None, :]
    return b_g + tl.sum(b_x[:, :, None] * tl.reshape(b_m, (BT, DP, DP)), 1)


@triton.jit
def add_rows(b_x, b_u, b_w, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, BT: tl.constexpr, DP: tl.constexpr,
             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Add one chunk of rows (x, u, w) to the raw sums; padded rows are zero and add nothing."""
    b_x2 = outer_rows(b_x, BT, DP)
    b_s0 += tl.sum(b_u, 0)
    b_s1 += mm(tl.trans(b_x), b_u, DOT_DTYPE, PRECISION)
    b_s2 += mm(tl.trans(b_x2), b_u, DOT_DTYPE, PRECISION)
    b_z0 += tl.sum(b_w, 0)
    b_z1 += tl.sum(b_x * b_w[:, None], 0)
    b_z2 += tl.sum(b_x2 * b_w[:, None], 0)
    return b_s0, b_s1, b_s2, b_z0, b_z1, b_z2


@triton.jit
def state_pointers(state, z, o_v, DV, DP: tl.constexpr):
    """Pointers of the S0/S1/S2 rows (value columns o_v) and the z entries of one raw state [F, DV]."""
    o_d = tl.arange(0, DP)
    o_dd = tl.arange(0, DP * DP)
    return (state + o_v, state + (1 + o_d)[:, None] * DV + o_v[None, :],
            state + (1 + DP + o_dd)[:, None] * DV + o_v[None, :], z, z + 1 + o_d, z + 1 + DP + o_dd)


@triton.jit
def load_state(state, z, o_v, m_v, DV, DP: tl.constexpr):
    p_s0, p_s1, p_s2, p_z0, p_z1, p_z2 = state_pointers(state, z, o_v, DV, DP)
    return (tl.load(p_s0, mask=m_v, other=0.0), tl.load(p_s1, mask=m_v[None, :], other=0.0),
            tl.load(p_s2, mask=m_v[None, :], other=0.0), tl.load(p_z0), tl.load(p_z1), tl.load(p_z2))


@triton.jit
def store_state(state, z, o_v, m_v, DV, DP: tl.constexpr, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, STORE_Z):
    p_s0, p_s1, p_s2, p_z0, p_z1, p_z2 = state_pointers(state, z, o_v, DV, DP)
    tl.store(p_s0, b_s0, mask=m_v)
    tl.store(p_s1, b_s1, mask=m_v[None, :])
    tl.store(p_s2, b_s2, mask=m_v[None, :])
    if STORE_Z:  # z does not depend on the value block: one program per row writes it
        tl.store(p_z0, b_z0)
        tl.store(p_z1, b_z1)
        tl.store(p_z2, b_z2)


@triton.jit(do_not_specialize=["T", "DV", "SEG", "NS"])  # one compile serves every length
def _segment_sums_kernel(
    x, u, den, w, seg_state, seg_z,
    T, DV, SEG, NS, x_scale,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_ub, stride_ut, stride_uh, stride_ud,
    stride_nb, stride_nt, stride_nh,
    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    ROW_WEIGHTS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Raw sums of one segment's rows into seg_state/seg_z[b*h, segment], x = x_scale * x. ROW_WEIGHTS says
    what u and w are: "ones" (the forward's keys: u as is, w = 1), "zeros" (u as is, w = 0) or "loaded"
    (the backward's queries: u / den, w from `w`)."""
    i_v, i_b, i_h, i_bh, i_s, o_v, m_v = program_coords(DV, H, BV)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    b_s0 = tl.zeros([BV], dtype=tl.float32)
    b_s1 = tl.zeros([DP, BV], dtype=tl.float32)
    b_s2 = tl.zeros([DP * DP, BV], dtype=tl.float32)
    b_z0 = tl.zeros([], dtype=tl.float32)
    b_z1 = tl.zeros([DP], dtype=tl.float32)
    b_z2 = tl.zeros([DP * DP], dtype=tl.float32)
    p_x = x + i_b * stride_xb + i_h * stride_xh
    p_u = u + i_b * stride_ub + i_h * stride_uh
    t_start, t_end = segment_span(i_s, SEG, BT, T)
    for t0 in range(t_start, t_end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_x = load_tile(p_x, o_t, m_t, stride_xt, o_d, m_d, stride_xd) * x_scale
        b_u = load_tile(p_u, o_t, m_t, stride_ut, o_v, m_v, stride_ud)
        if ROW_WEIGHTS == "loaded":
            o_n = i_b * stride_nb + o_t * stride_nt + i_h * stride_nh
            b_u = b_u / tl.load(den + o_n, mask=m_t, other=1.0)[:, None]
            b_w = tl.load(w + o_n, mask=m_t, other=0.0)
        elif ROW_WEIGHTS == "ones":
            b_w = m_t.to(tl.float32)
        else:
            b_w = tl.zeros([BT], dtype=tl.float32)
        b_s0, b_s1, b_s2, b_z0, b_z1, b_z2 = add_rows(b_x, b_u, b_w, b_s0, b_s1, b_s2, b_z0, b_z1, b_z2,
                                                      BT, DP, DOT_DTYPE, PRECISION)
    F = 1 + DP + DP * DP
    store_state(seg_state + (i_bh * NS + i_s) * F * DV, seg_z + (i_bh * NS + i_s) * F, o_v, m_v, DV, DP,
                b_s0, b_s1, b_s2, b_z0, b_z1, b_z2, i_v == 0)


# ---- host side ---------------------------------------------------------------------------------------------

def padded_feature_dim(d: int) -> int:
    """DP: d zero-padded so that the kernels' matrix products have K >= 16."""
    if d > 16:
        raise ValueError(f"the Triton linear-attention kernels support feature dim d <= 16, got d={d}; "
                         "use backend='torch'")
    return 16


def raw_feature_count(dp: int) -> int:
    return 1 + dp + dp * dp


def dot_config(dtype: torch.dtype, device: torch.device):
    """(operand dtype, precision) of the kernels' matrix products: bf16 tensor cores for half inputs
    (fp16 too: state sums can overflow fp16's range), exact fp32 for fp32 inputs (tf32 would cost ~3e-4).

    Triton's CPU interpreter multiplies bf16 blocks wrongly (seen with Triton 3.9: errors of 1e10), so
    there every product runs in fp32.
    """
    if dtype == torch.float32 or device.type != "cuda":
        return tl.float32, "ieee"
    return tl.bfloat16, "tf32"


class Launch:
    """Block sizes, grid and segment split shared by every kernel of one call."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor):
        B, T, H, D = q.shape
        self.B, self.T, self.H, self.D, self.DV = B, T, H, D, v.shape[-1]
        self.DP = padded_feature_dim(D)
        self.F = raw_feature_count(self.DP)
        # At least 16 columns: tensor-core products need K >= 16, and the backward contracts over the value block.
        self.BV = min(BLOCK_V, max(16, triton.next_power_of_2(self.DV)))
        self.n_vblocks = triton.cdiv(self.DV, self.BV)
        n_chunks = triton.cdiv(T, CHUNK)
        self.BT = CHUNK
        seg = triton.cdiv(n_chunks, self._num_segments(n_chunks, self.n_vblocks * B * H, q.device))
        self.SEG, self.NS = seg, triton.cdiv(n_chunks, seg)
        self.grid = (self.n_vblocks, B * H, self.NS)
        dot_dtype, precision = dot_config(q.dtype, q.device)
        self.constexprs = dict(H=H, D=D, DP=self.DP, BT=self.BT, BV=self.BV, DOT_DTYPE=dot_dtype,
                               PRECISION=precision, num_warps=NUM_WARPS)

    @staticmethod
    def _num_segments(n_chunks: int, programs_per_segment: int, device: torch.device) -> int:
        """Split the sequence only while the programs still fit in one wave: each extra segment costs one
        more pass over its rows and one more state in memory, and a second wave (two programs fit per SM,
        limited by registers) doubles the time."""
        if device.type != "cuda":
            return min(n_chunks, 2)  # the interpreter: exercise the segmented path on small inputs
        slots = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_chunks, slots // programs_per_segment))

    def zeros_state(self, device):
        f32 = dict(device=device, dtype=torch.float32)
        return (torch.zeros(self.B * self.H, 1, self.F, self.DV, **f32),
                torch.zeros(self.B * self.H, 1, self.F, **f32))

    def segment_sums(self, x, u, x_scale=1.0, den=None, w=None, count_rows=True):
        """Per-segment raw sums [B*H, NS, F, DV] and [B*H, NS, F] (see `_segment_sums_kernel`): rows weighted
        by `w` with u divided by `den` when given, else by 1 (count_rows) or 0."""
        f32 = dict(device=x.device, dtype=torch.float32)
        seg_state = torch.empty(self.B * self.H, self.NS, self.F, self.DV, **f32)
        seg_z = torch.empty(self.B * self.H, self.NS, self.F, **f32)
        row_scaled = den is not None
        den_strides = den.stride() if row_scaled else (0, 0, 0)
        _segment_sums_kernel[self.grid](
            x, u, den if row_scaled else x, w if row_scaled else x, seg_state, seg_z,
            self.T, self.DV, self.SEG, self.NS, x_scale, *x.stride(), *u.stride(), *den_strides,
            ROW_WEIGHTS="loaded" if row_scaled else ("ones" if count_rows else "zeros"), **self.constexprs)
        return seg_state, seg_z


def segment_starts(init, seg, causal: bool, reverse: bool = False):
    """The state each segment starts from: `init` [B*H, 1, ...] plus the sums of the segments before it
    (after it when `reverse`) when causal; the one total state, shared by every segment, when not."""
    if not causal:
        return (init + seg.sum(1, keepdim=True)).expand_as(seg)
    if reverse:
        return segment_starts(init, seg.flip(1), causal).flip(1)
    return torch.cat([init, seg[:, :-1]], 1).cumsum(1)


def key_state_starts(launch: Launch, k, v, state0, z0, causal: bool):
    """The raw key state each segment starts from ([B*H, NS, F, DV] and [B*H, NS, F], possibly expanded
    views): the initial state (zeros when None) plus the keys before the segment, or all keys when not
    causal."""
    BH, F, DV = launch.B * launch.H, launch.F, launch.DV
    if state0 is None:
        state0, z0 = launch.zeros_state(k.device)
    state0, z0 = state0.reshape(BH, 1, F, DV), z0.reshape(BH, 1, F)
    if causal and launch.NS == 1:
        return state0, z0
    seg_state, seg_z = launch.segment_sums(k, v)
    return segment_starts(state0, seg_state, causal), segment_starts(z0, seg_z, causal)
