"""The Triton linear-attention kernels against the float64 quadratic formula.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by .ci/run before triton is imported);
on a GPU the gpu-marked tests run them compiled. Freshly allocated outputs are NaN (deterministic mode
fills uninitialised memory), so an element a kernel forgets to write fails the comparison.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import LinearAttentionState, linear_attention
from tests.helpers import TOLERANCE, assert_close
from tests.test_linear_attention import quadratic_reference, random_qkv, state_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


def check_against_reference(B, T, H, d, dv, dtype, causal, normalize, with_state, device, backend="triton"):
    """Forward, returned state and every gradient (q, k, v, initial kv/ksum) of the `backend` op."""
    q, k, v = (x.to(device).requires_grad_() for x in random_qkv(B, T, H, d, dv, dtype))
    prefix = initial = None
    if with_state:
        k0, v0 = (x.to(device) for x in random_qkv(B, 7, H, d, dv, torch.float64)[1:])
        kv0, ksum0 = state_reference(k0, v0)
        prefix = (k0, v0)
        initial = LinearAttentionState(kv0.float().requires_grad_(), ksum0.float().requires_grad_())
    out, state = linear_attention(q, k, v, causal=causal, normalize=normalize, initial_state=initial,
                                  return_state=True, backend=backend)

    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    init64 = None
    if with_state:
        init64 = LinearAttentionState(*(x.detach().double().requires_grad_() for x in initial))
    ref = quadratic_reference(qd, kd, vd, causal=causal, normalize=normalize, prefix=prefix)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    kv_ref, ksum_ref = state_reference(kd.detach(), vd.detach())
    if with_state:
        kv_ref, ksum_ref = kv_ref + init64.kv.detach(), ksum_ref + init64.ksum.detach()
    assert_close(state.kv, kv_ref, dtype, "final kv")
    assert_close(state.ksum, ksum_ref, dtype, "final ksum")

    # Gradients through the output and the final state, against autograd of the float64 reference op.
    grad_o, grad_kv, grad_ksum = torch.randn_like(ref), torch.randn_like(kv_ref), torch.randn_like(ksum_ref)
    loss = (out.double() * grad_o).sum() + (state.kv.double() * grad_kv).sum() + (state.ksum.double() * grad_ksum).sum()
    loss.backward()
    ref_out, ref_state = linear_attention(qd, kd, vd, causal=causal, normalize=normalize, initial_state=init64,
                                          return_state=True, backend="torch")
    ((ref_out * grad_o).sum() + (ref_state.kv * grad_kv).sum() + (ref_state.ksum * grad_ksum).sum()).backward()
    pairs = [("dq", q, qd), ("dk", k, kd), ("dv", v, vd)]
    if normalize and T == 1 and not with_state:
        # o = v (1 - eps/a): dq is O(eps), pure cancellation (see test_linear_attention.py). Check it is tiny.
        assert q.grad.abs().max() < TOLERANCE[dtype] * grad_o.abs().max().item()
        pairs = pairs[1:]
    if with_state:
        pairs += [("d kv0", initial.kv, init64.kv), ("d ksum0", initial.ksum, init64.ksum)]
    for name, x, xd in pairs:
        assert_close(x.grad, xd.grad, dtype, name)


interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernels on CPU")


@interpreter_only
@settings(max_examples=12)
@given(T=st.sampled_from([1, 63, 130]), d=st.sampled_from([16, 8]), dv=st.sampled_from([64, 24]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), causal=st.booleans(), normalize=st.booleans(),
       with_state=st.booleans())
def test_interpreted_kernels_match_reference(T, d, dv, dtype, causal, normalize, with_state):
    check_against_reference(1, T, 2, d, dv, dtype, causal, normalize, with_state, "cpu")


@interpreter_only
def test_interpreted_kernels_take_non_contiguous_inputs():
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(2, 70, 3, 16, 40, torch.float32))
    assert not q.is_contiguous()
    out = linear_attention(q, k, v, backend="triton")
    assert_close(out, quadratic_reference(q, k, v), torch.float32)


def test_triton_backend_rejects_what_it_cannot_run():
    q, k, v = random_qkv(1, 4, 1, 32, 8, torch.float32)
    if INTERPRETED or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with pytest.raises(ValueError, match="feature dim d <= 16"):
            linear_attention(q.to(device), k.to(device), v.to(device), backend="triton")
        q, k, v = (x[..., :16].double().to(device) for x in (q, k, v))
        with pytest.raises(TypeError, match="take float16, bfloat16 or float32"):
            linear_attention(q, k, v, backend="triton")
    else:
        with pytest.raises(ValueError, match="cannot run on cpu"):
            linear_attention(q, k, v, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("dv", [64, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kernels_match_reference(T, dv, dtype):
    for causal in (True, False):
        for normalize in (True, False):
            for with_state in (False, True):
                check_against_reference(2, T, 2, 16, dv, dtype, causal, normalize, with_state, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d, dv", [(1, 1), (4, 6), (8, 24), (16, 15)])
def test_gpu_kernels_take_small_feature_and_value_dims(d, dv):
    """Below 16 features or value columns the kernels pad to the tensor cores' minimum K (no compile error)."""
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(2, 70, 2, d, dv, dtype, True, True, True, "cuda")


@pytest.mark.gpu
def test_gpu_auto_backend_compiles_without_graph_breaks():
    q, k, v = (x.cuda() for x in random_qkv(2, 300, 4, 16, 64, torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v) * 2, fullgraph=True)
    assert_close(compiled(q, k, v), 2 * quadratic_reference(q, k, v), torch.bfloat16)
