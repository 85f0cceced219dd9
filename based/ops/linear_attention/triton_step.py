"""Fused Triton decode step of Taylor linear attention on the public 153-feature state.

One program per (batch, head) streams that head's state once: for each block of features it builds phi(q)
and phi(k) in registers, adds phi(k) outer v to the kv rows, stores them, and accumulates phi(q) . kv_new
into the output, so the step reads and writes the fp32 state exactly once (the step is bound by those
bytes). ksum is updated by the same program, which is why one program owns all of a head's value columns:
split across programs, a reader of ksum could see another program's update.

Every feature is a product of two entries of x_aug = [1, x]: feature f = x_aug[a_f] * x_aug[b_f] * c_f
(the constant: a = b = 0; first order: a = 0; second order: 1 <= a <= b), with the pairs and scales of
`feature_map.reference` gathered from small tables.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from based.ops._backend import decode_launch
from based.ops._layout import require_unit_stride, unit_stride
from based.ops._triton import let_next_kernel_start, wait_for_previous_kernel
from based.ops._validate import check_kernel_dtype
from based.ops.feature_map.reference import second_order_index

# (features per block, warps); measurements in docs/PERFORMANCE.md. With a program for every SM or more the step
# streams the state, and 32-feature blocks on 4 warps keep enough of it in flight. At batch 1 the few programs
# are latency-bound: one block of all 153 features on 8 warps issues every load at once.
MANY_PROGRAMS = (32, 4)
FEW_PROGRAMS = (256, 8)
INTERPRETER_FEATURES = 32


@functools.lru_cache(maxsize=None)
def feature_pairs(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) of every feature, indices into x_aug = [1, x]; built once per (d, device)."""
    rows, cols, second_scale = second_order_index(d, device, torch.float32)
    first = torch.arange(1, d + 1, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    a = torch.cat([zero, torch.zeros(d, dtype=torch.int64, device=device), rows + 1])
    b = torch.cat([zero, first, cols + 1])
    c = torch.cat([torch.ones(1, device=device), torch.full((d,), d**-0.25, device=device), second_scale])
    return a.to(torch.int32), b.to(torch.int32), c


@triton.jit
def _gather_feature(x, o_f, m_f, p_a, p_b, p_c):
    """phi(x)[o_f] from the pair tables; x points at one row of d values."""
    b_a = tl.load(p_a + o_f, mask=m_f, other=0)
    b_b = tl.load(p_b + o_f, mask=m_f, other=0)
    b_xa = tl.load(x + b_a - 1, mask=m_f & (b_a > 0), other=1.0).to(tl.float32)
    b_xb = tl.load(x + b_b - 1, mask=m_f & (b_b > 0), other=1.0).to(tl.float32)
    return b_xa * b_xb * tl.load(p_c + o_f, mask=m_f, other=0.0)


@triton.jit
def _step_kernel(
    q, k, v, kv, ksum, o, pair_a, pair_b, pair_c, E, eps,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_sb, stride_sh, stride_se, stride_zb, stride_zh,
    H: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr,
):
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, BV)
    m_c = o_c < DV
    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_k = k + i_b * stride_kb + i_h * stride_kh
    b_v = tl.load(v + i_b * stride_vb + i_h * stride_vh + o_c, mask=m_c, other=0.0).to(tl.float32)
    p_kv = kv + i_b * stride_sb + i_h * stride_sh
    p_ksum = ksum + i_b * stride_zb + i_h * stride_zh

    b_num = tl.zeros([BV], dtype=tl.float32)
    b_den = tl.zeros([BF], dtype=tl.float32)
    for f0 in range(0, E, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < E
        b_phi_q = _gather_feature(p_q, o_f, m_f, pair_a, pair_b, pair_c)
        b_phi_k = _gather_feature(p_k, o_f, m_f, pair_a, pair_b, pair_c)
        p_rows = p_kv + o_f[:, None] * stride_se + o_c[None, :]
        m_rows = m_f[:, None] & m_c[None, :]
        b_kv = tl.load(p_rows, mask=m_rows, other=0.0) + b_phi_k[:, None] * b_v[None, :]
        tl.store(p_rows, b_kv, mask=m_rows)
        b_num += tl.sum(b_phi_q[:, None] * b_kv, 0)
        b_ksum = tl.load(p_ksum + o_f, mask=m_f, other=0.0) + b_phi_k
        tl.store(p_ksum + o_f, b_ksum, mask=m_f)
        b_den += b_phi_q * b_ksum
    if NORMALIZE:
        b_num = b_num / (tl.sum(b_den, 0) + eps)
    tl.store(o + i_b * stride_ob + i_h * stride_oh + o_c, b_num.to(o.dtype.element_ty), mask=m_c)


@torch.library.custom_op("based::linear_attention_step_triton", mutates_args=("kv", "ksum"))
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor,
             normalize: bool, eps: float) -> torch.Tensor:
    B, H, d = q.shape
    DV = v.shape[-1]
    # The kernel addresses the feature dim of q, k, ksum and the value dim of v, o and kv with unit stride.
    q, k, v = (unit_stride(x) for x in (q, k, v))
    o = torch.empty(B, H, DV, device=q.device, dtype=v.dtype)
    pair_a, pair_b, pair_c = feature_pairs(d, q.device)
    BF, launch = decode_launch(q.device, B * H, FEW_PROGRAMS, MANY_PROGRAMS, INTERPRETER_FEATURES)
    _step_kernel[(B * H,)](
        q, k, v, kv, ksum, o, pair_a, pair_b, pair_c, kv.shape[2], eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), ksum.stride(0), ksum.stride(1),
        H=H, DV=DV, BF=BF, BV=triton.next_power_of_2(DV), NORMALIZE=normalize, **launch)
    return o


@_step_op.register_fake
def _(q, k, v, kv, ksum, normalize, eps):
    return v.new_empty(v.shape)


def linear_attention_step_triton(q, k, v, state, normalize: bool, eps: float):
    """Same contract as `reference.linear_attention_step_torch`, in one Triton launch; the state must be
    fp32 with unit stride along its value dim (as `LinearAttentionState.zeros` makes it)."""
    check_kernel_dtype(q.dtype, "the Triton linear-attention step kernels take")
    if state.kv.dtype != torch.float32:
        raise TypeError(f"the Triton linear-attention step needs an fp32 state, got state.kv {state.kv.dtype}; "
                        "use backend='torch'")
    for name, x in (("state.kv", state.kv), ("state.ksum", state.ksum)):
        require_unit_stride(name, x, "the Triton linear-attention step")
    return _step_op(q, k, v, state.kv, state.ksum, normalize, eps)
