"""Pieces shared by the Triton kernels of sliding-window attention.

Layouts: q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, DV]` (any strides), query head h reads kv
head h // G. Query i sits at key position p = i + Tk - Tq and sees keys p - window < j <= p. Scores are
kept in base 2 (`scale * log2(e)` folded into q.k) so the softmax uses exp2; `lse` is the per-row
log2-sum-exp2 of those scores, saved by the forward for the backward.

Work split: the forward and dq kernels take one block of BM queries of one head per program and visit
only the key blocks that meet the band of their window; the dk/dv kernel takes one block of BN keys of
one kv head and visits the query blocks (of every query head of the group) whose windows reach it. So
time is O(T * window), whatever T is.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2_E = math.log2(math.e)


class BlockConfig:
    """Block sizes and warps of one kernel launch; the interpreter gets small fixed blocks."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                 num_warps: int, num_stages: int, max_registers: int | None = None):
        """max_registers caps registers per thread for head dims <= 64 (larger tiles would spill)."""
        interpreted = q.device.type != "cuda"
        self.BM, self.BN = (16, 16) if interpreted else (block_m, block_n)
        self.BD = max(16, triton.next_power_of_2(k.shape[-1]))
        self.BDV = max(16, triton.next_power_of_2(v.shape[-1]))
        self.launch = {} if interpreted else dict(num_warps=num_warps, num_stages=num_stages)
        if not interpreted and max_registers is not None and max(self.BD, self.BDV) <= 64:
            self.launch["maxnreg"] = max_registers
        self.DOT_DTYPE, self.PRECISION = operand_config(q.dtype, q.device)


def operand_config(dtype: torch.dtype, device: torch.device):
    """(operand dtype, precision) of the kernels' matrix products: the inputs' own half dtype on tensor
    cores; exact fp32 products for fp32 inputs (tf32 would cost ~1e-3). Triton's CPU interpreter multiplies
    bf16 blocks wrongly (Triton 3.9), so there everything is fp32."""
    if dtype == torch.float32 or device.type != "cuda":
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"


@triton.jit
def query_block(Tq, Tk, H: tl.constexpr, G: tl.constexpr, BM: tl.constexpr):
    """This program's batch, query head, kv head, batch*head, query rows, their mask and key positions."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    return i_bh // H, i_bh % H, (i_bh % H) // G, i_bh, o_m, o_m < Tq, o_m + Tk - Tq


@triton.jit
def query_positions(Tq, Tk, BM: tl.constexpr):
    """Key positions of this program's first and last real query."""
    i_m = tl.program_id(0)
    return i_m * BM + Tk - Tq, tl.minimum((i_m + 1) * BM, Tq) - 1 + Tk - Tq


@triton.jit
def head_columns(D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """Column offsets and masks of the key/query head dim and of the value head dim."""
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    return o_d, o_dv, o_d < D, o_dv < DV


@triton.jit
def band_mask(p_m, m_m, o_n, Tk, window):
    """[BM, BN]: query (key position p_m, valid m_m) sees key o_n."""
    return ((o_n[None, :] <= p_m[:, None]) & (o_n[None, :] > p_m[:, None] - window) & (o_n < Tk)[None, :]
            & m_m[:, None])


@triton.jit
def key_span(first_pos, last_pos, window, BN: tl.constexpr):
    """Key blocks [lo, hi) seen by queries at positions first_pos .. last_pos, lo aligned to BN."""
    lo = tl.maximum(first_pos - window + 1, 0)
    return (lo // BN) * BN, last_pos + 1


@triton.jit
def load_rows(ptr, o_r, m_r, stride_r, o_c, m_c, stride_c):
    """[len(o_r), len(o_c)] tile; rows and columns outside the masks read as 0."""
    return tl.load(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, mask=m_r[:, None] & m_c[None, :],
                   other=0.0)


@triton.jit
def store_rows(ptr, x, o_r, m_r, stride_r, o_c, m_c, stride_c):
    tl.store(ptr + o_r[:, None] * stride_r + o_c[None, :] * stride_c, x.to(ptr.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)
