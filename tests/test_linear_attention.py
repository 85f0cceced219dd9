"""Taylor linear attention against an independent quadratic float64 formula."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import LinearAttentionState, linear_attention, linear_attention_step, taylor_feature_map
from tests.helpers import assert_close, largest_intermediate


def quadratic_reference(q, k, v, *, causal=True, normalize=True, eps=1e-6, prefix=None):
    """o_i = sum_j a_ij v_j / (sum_j a_ij + eps), a_ij = 1 + s + s^2/2, all in float64, T x T.

    `prefix` = (k0, v0): keys/values that precede the sequence (what an initial state summarises).
    """
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    a = 1 + s + s * s / 2
    if causal:
        a = a.tril()
    num = torch.einsum("bhij,bjhd->bihd", a, v)
    den = a.sum(-1).transpose(1, 2)[..., None]
    if prefix is not None:
        k0, v0 = prefix[0].double(), prefix[1].double()
        s0 = torch.einsum("bihd,bjhd->bhij", q, k0) / math.sqrt(q.shape[-1])
        a0 = 1 + s0 + s0 * s0 / 2
        num = num + torch.einsum("bhij,bjhd->bihd", a0, v0)
        den = den + a0.sum(-1).transpose(1, 2)[..., None]
    return num / (den + eps) if normalize else num


def state_reference(k, v):
    """sum_j phi(k_j) outer v_j and sum_j phi(k_j), float64."""
    phi = taylor_feature_map(k.double(), backend="torch")
    return torch.einsum("bthe,bthd->bhed", phi, v.double()), phi.sum(1)


def random_qkv(B, T, H, d, dv, dtype, requires_grad=False):
    # Scale q, k so that s = q.k/sqrt(d) is O(1): the regime trained models run in.
    q = torch.randn(B, T, H, d, dtype=dtype) * 0.5
    k = torch.randn(B, T, H, d, dtype=dtype) * 0.5
    v = torch.randn(B, T, H, dv, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.sampled_from([1, 2, 63, 64, 65, 130]) | st.integers(1, 150),
    "H": st.integers(1, 3),
    "d": st.sampled_from([1, 4, 8, 16]),
    "dv": st.sampled_from([1, 7, 64, 112]),
})


@given(shape=shapes, causal=st.booleans(), normalize=st.booleans(), with_state=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_forward_and_gradients_match_quadratic_formula(shape, causal, normalize, with_state, dtype):
    B, T, H, d, dv = (shape[key] for key in "B T H d dv".split())
    q, k, v = random_qkv(B, T, H, d, dv, dtype, requires_grad=True)
    prefix = initial = None
    if with_state:
        k0, v0 = random_qkv(B, 5, H, d, dv, torch.float64)[1:]
        kv0, ksum0 = state_reference(k0, v0)
        prefix = (k0, v0)
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        initial = LinearAttentionState(kv0.to(state_dtype).requires_grad_(), ksum0.to(state_dtype).requires_grad_())

    out = linear_attention(q, k, v, causal=causal, normalize=normalize, initial_state=initial)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = quadratic_reference(qd, kd, vd, causal=causal, normalize=normalize, prefix=prefix)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)

    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    checked = (("dq", q, qd), ("dk", k, kd), ("dv", v, vd))
    if normalize and T == 1 and not with_state:
        # o = a v / (a + eps) = v (1 - eps/a): dq and dk are O(eps), pure cancellation; fp32 gets them to
        # O(eps * fp32 rounding) absolutely, which no relative measure can judge. Check they are tiny.
        assert max(q.grad.abs().max(), k.grad.abs().max()) < 1e-4 * grad.abs().max().item()
        checked = checked[2:]
    for name, x, xd in checked:
        assert_close(x.grad, xd.grad, dtype, name)
    if with_state:
        # Gradient of the state: compare with autograd through a float64 re-run of the op itself.
        kv64 = initial.kv.detach().double().requires_grad_()
        ks64 = initial.ksum.detach().double().requires_grad_()
        ref2 = linear_attention(qd.detach(), kd.detach(), vd.detach(), causal=causal, normalize=normalize,
                                initial_state=LinearAttentionState(kv64, ks64))
        ref2.backward(grad)
        assert_close(initial.kv.grad, kv64.grad, dtype, "d kv0")
        if normalize:  # without normalisation ksum does not enter the output
            assert_close(initial.ksum.grad, ks64.grad, dtype, "d ksum0")
        else:
            assert initial.ksum.grad is None and ks64.grad is None


@given(shape=shapes, split=st.floats(0.0, 1.0), causal=st.booleans())
def test_returned_state_and_split_equal_whole(shape, split, causal):
    B, T, H, d, dv = (shape[key] for key in "B T H d dv".split())
    q, k, v = random_qkv(B, T, H, d, dv, torch.float64)
    out, state = linear_attention(q, k, v, causal=causal, return_state=True)
    kv_ref, ksum_ref = state_reference(k, v)
    assert_close(state.kv, kv_ref, torch.float64, "kv")
    assert_close(state.ksum, ksum_ref, torch.float64, "ksum")

    if not causal:
        return
    t = min(max(int(split * T), 1), T)  # at least one token in the first part
    o1, s1 = linear_attention(q[:, :t], k[:, :t], v[:, :t], return_state=True)
    parts = [o1]
    if t < T:
        o2, s1 = linear_attention(q[:, t:], k[:, t:], v[:, t:], initial_state=s1, return_state=True)
        parts.append(o2)
    assert_close(torch.cat(parts, 1), out, torch.float64, "split output")
    assert_close(s1.kv, kv_ref, torch.float64, "split state")


@settings(max_examples=10)
@given(shape=shapes, normalize=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_steps_match_parallel_at_every_position(shape, normalize, dtype):
    B, T, H, d, dv = (shape[key] for key in "B T H d dv".split())
    T = min(T, 70)
    q, k, v = random_qkv(B, T, H, d, dv, dtype)
    state = LinearAttentionState.zeros(B, H, d, dv, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    steps = torch.stack([linear_attention_step(q[:, t], k[:, t], v[:, t], state, normalize=normalize)
                         for t in range(T)], 1)
    assert_close(steps, quadratic_reference(q, k, v, normalize=normalize), dtype)
    kv_ref, ksum_ref = state_reference(k, v)
    assert_close(state.kv, kv_ref, dtype, "kv after steps")
    assert_close(state.ksum, ksum_ref, dtype, "ksum after steps")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = random_qkv(2, 100, 2, 16, 64, dtype)
    out, state = linear_attention(q, k, v, return_state=True)
    assert out.dtype == dtype and state.kv.dtype == torch.float32
    assert_close(out, quadratic_reference(q, k, v), dtype)


def test_memory_is_linear_in_sequence_length():
    sizes = {}
    for T in (16384, 32768):
        q, k, v = random_qkv(1, T, 1, 16, 16, torch.float32)
        sizes[T] = largest_intermediate(linear_attention, q, k, v)
    assert sizes[32768] <= 2.1 * sizes[16384], f"largest intermediates {sizes}: not linear in T"
    assert sizes[32768] < 32768 * 1024, f"an intermediate of {sizes[32768]} elements at T=32768"


def test_feature_map_dot_product_is_taylor_series():
    q, k = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    assert phi_q.shape[-1] == 153
    s = (q * k).sum(-1) / 4
    assert_close((phi_q * phi_k).sum(-1), 1 + s + s * s / 2, torch.float64)


# ---- bad input -------------------------------------------------------------------------------------------

def _qkv(B=1, T=4, H=2, d=16, dv=8, dtype=torch.float32):
    return random_qkv(B, T, H, d, dv, dtype)


@pytest.mark.parametrize("make, error, words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[:, :3], v), ValueError, "q and k"),
    (lambda q, k, v: (q, k, v[:, :3]), ValueError, "q and v"),
    (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "q and v"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q has dtype int32"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "share a dtype"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v on meta"),
    (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "q must not have empty dimensions"),
])
def test_bad_inputs_raise(make, error, words):
    with pytest.raises(error, match=words):
        linear_attention(*make(*_qkv()))


def test_bad_state_and_backend_raise():
    q, k, v = _qkv()
    good = LinearAttentionState.zeros(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"state.kv must have shape \(1, 2, 153, 8\)"):
        linear_attention(q, k, v, initial_state=LinearAttentionState.zeros(1, 2, 16, 9))
    with pytest.raises(ValueError, match="state.ksum must have shape"):
        linear_attention(q, k, v, initial_state=LinearAttentionState(good.kv, good.ksum[:, :, :-1]))
    with pytest.raises(TypeError, match="state.kv has dtype float16"):
        linear_attention(q, k, v, initial_state=LinearAttentionState(good.kv.half(), good.ksum))
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention(q, k, v, initial_state=(good.kv, good.ksum))
    with pytest.raises(ValueError, match="state.ksum on meta"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], LinearAttentionState(good.kv, good.ksum.to("meta")))
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        linear_attention_step(q, k, v, good)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        linear_attention(q, k, v, eps=-1.0)
