"""The Hopper CUDA kernels of linear attention (backend="cuda"), forward and backward, against the float64
quadratic formula.

Runs on a compute capability 9.0 GPU with `based._C` built with the CUTLASS headers.
"""
import pytest
import torch

from based.ops import LinearAttentionState, linear_attention
from based.ops.linear_attention.cuda_op import KERNEL_BUILT
from tests.helpers import assert_close
from tests.test_linear_attention import quadratic_reference, random_qkv, state_reference
from tests.test_linear_attention_triton import check_against_reference

pytest.importorskip("triton")


def _hopper_kernel() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and KERNEL_BUILT


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _hopper_kernel(), reason="needs a compute capability 9.0 GPU and based._C with CUTLASS"),
    pytest.mark.usefixtures("nan_filled_allocations"),
]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("dv", [64, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference(T, dv, dtype):
    for normalize in (True, False):
        for with_state in (False, True):
            check_against_reference(2, T, 2, 16, dv, dtype, True, normalize, with_state, "cuda", backend="cuda")


@pytest.mark.parametrize("how", ["sliced", "transposed", "offset"])
def test_strided_inputs_give_the_contiguous_result(how):
    q, k, v = (x.cuda() for x in random_qkv(2, 200, 3, 16, 64, torch.bfloat16))
    grad_o = torch.randn_like(v)

    def view(x):
        if how == "sliced":  # every other head of a wider tensor
            wide = torch.empty(*x.shape[:2], 2 * x.shape[2], x.shape[3], device="cuda", dtype=x.dtype)
            wide[:, :, ::2] = x
            return wide[:, :, ::2]
        if how == "transposed":  # [B, H, T, d] memory
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        flat = torch.empty(x.numel() + 3, device="cuda", dtype=x.dtype)  # misaligned start
        flat[3:] = x.flatten()
        return flat[3:].view(x.shape)

    def run(q, k, v, grad_o):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = linear_attention(q, k, v, backend="cuda")
        out.backward(grad_o)
        return out, q.grad, k.grad, v.grad

    views = [view(x) for x in (q, k, v, grad_o)]
    assert all(not (a.is_contiguous() and a.data_ptr() % 16 == 0) for a in views)
    for got, want in zip(run(*views), run(q, k, v, grad_o)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck():
    # The kernels' ops take plain tensors (linear_attention_sm90's C++ autograd node differentiates them); the
    # differentiable op is checked with inputs and an initial state that require grad.
    q, k, v = (x.cuda() for x in random_qkv(1, 100, 2, 16, 64, torch.bfloat16))
    k0, v0 = (x.cuda() for x in random_qkv(1, 5, 2, 16, 64, torch.float64)[1:])
    kv0, ksum0 = (x.float() for x in state_reference(k0, v0))
    torch.library.opcheck(torch.ops.based.linear_attention_fwd_sm90, (q, k, v, kv0, ksum0, True, 1e-6, True, True))
    o, den, kv, ksum = torch.ops.based.linear_attention_fwd_sm90(q, k, v, kv0, ksum0, True, 1e-6, True, True)
    dout = torch.randn_like(v)
    d_kv, d_ksum = torch.randn_like(kv), torch.randn_like(ksum)
    torch.library.opcheck(torch.ops.based.linear_attention_bwd_sm90,
                          (q, k, v, o, dout, den, kv0, ksum0, d_kv, d_ksum, True))
    torch.library.opcheck(torch.ops.based.linear_attention_bwd_sm90,
                          (q, k, v, o, dout, None, None, None, None, None, False))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, kv0, ksum0)]
    for normalize, return_state in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.based.linear_attention_sm90, (*leaves, normalize, 1e-6, return_state))
    torch.library.opcheck(torch.ops.based.linear_attention_sm90, (*leaves[:3], None, None, True, 1e-6, False))


@pytest.mark.parametrize("used", ["kv", "ksum"])
def test_state_only_gradients(used):
    """Only one part of the returned state is used: its gradient reaches k (and v), and none reaches q."""
    q, k, v = (x.cuda().requires_grad_() for x in random_qkv(1, 130, 2, 16, 64, torch.bfloat16))
    _, state = linear_attention(q, k, v, return_state=True, backend="cuda")
    getattr(state, used).sum().backward()
    kd, vd = (x.detach().double().requires_grad_() for x in (k, v))
    dict(zip(("kv", "ksum"), state_reference(kd, vd)))[used].sum().backward()
    assert torch.count_nonzero(q.grad) == 0
    assert_close(k.grad, kd.grad, torch.bfloat16, "dk")
    if vd.grad is None:  # ksum does not depend on v
        assert torch.count_nonzero(v.grad) == 0
    else:
        assert_close(v.grad, vd.grad, torch.bfloat16, "dv")


def test_compiles_without_graph_breaks():
    q, k, v = (x.cuda() for x in random_qkv(2, 300, 4, 16, 112, torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, backend="cuda") * 2, fullgraph=True)
    assert_close(compiled(q, k, v), 2 * quadratic_reference(q, k, v), torch.bfloat16)


def test_compiled_gradients_match_eager_and_float64():
    q, k, v = (x.cuda().requires_grad_() for x in random_qkv(2, 300, 4, 16, 112, torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, backend="cuda") * 2, fullgraph=True)

    def grads(fn, *inputs):
        fn(*inputs).float().square().sum().backward()
        out = [x.grad.clone() for x in inputs]
        for x in inputs:
            x.grad = None
        return out

    compiled_grads = grads(compiled, q, k, v)
    eager_grads = grads(lambda q, k, v: linear_attention(q, k, v, backend="cuda") * 2, q, k, v)
    ref_grads = grads(lambda q, k, v: 2 * quadratic_reference(q, k, v),
                      *(x.detach().double().requires_grad_() for x in (q, k, v)))
    for got, eager, ref in zip(compiled_grads, eager_grads, ref_grads):
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        assert_close(got, ref, torch.bfloat16)


def test_long_sequence_stays_finite_and_accurate():
    """65536 tokens: the fp32 state grows with T; the bf16 snapshots keep their relative precision."""
    q, k, v = (x.cuda() for x in random_qkv(1, 65536, 1, 16, 64, torch.bfloat16))
    out, state = linear_attention(q, k, v, return_state=True, backend="cuda")
    ref, ref_state = linear_attention(q.double(), k.double(), v.double(), return_state=True, backend="torch")
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.bfloat16)
    assert_close(state.kv, ref_state.kv, torch.bfloat16, "final kv")
    assert_close(state.ksum, ref_state.ksum, torch.bfloat16, "final ksum")


def test_rejects_what_it_cannot_run():
    q, k, v = (x.cuda() for x in random_qkv(1, 10, 1, 16, 64, torch.bfloat16))
    with pytest.raises(ValueError, match="causal only"):
        linear_attention(q, k, v, causal=False, backend="cuda")
    with pytest.raises(ValueError, match="feature dim of 16"):
        linear_attention(q[..., :8], k[..., :8], v, backend="cuda")
    with pytest.raises(ValueError, match="value dim in"):
        linear_attention(q, k, v[..., :32], backend="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        linear_attention(q.float(), k.float(), v.float(), backend="cuda")
    state = LinearAttentionState.zeros(1, 1, 16, 64, device="cuda")
    out = linear_attention(q, k, v, initial_state=state, backend="cuda")
    assert_close(out, quadratic_reference(q, k, v), torch.bfloat16)
