"""The decode step of the causal conv as a Triton helper, shared by the step kernel (`triton_step.py`) and the
matrix-vector kernel that runs BaseConv's in_proj with the conv gate fused (`based.ops.linear.triton_gemv`)."""
import triton
import triton.language as tl


@triton.jit
def conv_step(b_x, p_state, p_weight, m_d, stride_sk, stride_wk, K, BK: tl.constexpr):
    """One causal-conv step for a block of channels: shift each channel's K taps left, append `b_x` (cast to the
    state's dtype, so the output reads exactly the value the state keeps), store them, and return their dot with
    the conv weight in fp32. `p_state`, `p_weight`: pointers to each channel's first tap; `m_d`: live channels."""
    o_k = tl.arange(0, BK)
    m_dk = m_d[:, None] & (o_k < K)[None, :]
    p_s = p_state[:, None] + o_k[None, :] * stride_sk
    # Tap k takes the input tap k + 1 held; the newest tap takes x.
    b_older = tl.load(p_s + stride_sk, mask=m_d[:, None] & (o_k < K - 1)[None, :], other=0.0)
    b_s = tl.where((o_k == K - 1)[None, :], b_x.to(b_older.dtype)[:, None], b_older)
    # A channel's taps may sit in different threads: every old tap must be read before any is overwritten.
    tl.debug_barrier()
    tl.store(p_s, b_s, mask=m_dk)
    b_w = tl.load(p_weight[:, None] + o_k[None, :] * stride_wk, mask=m_dk, other=0.0)
    return tl.sum(b_s.to(tl.float32) * b_w.to(tl.float32), 1)
