"""Causal depthwise convolution against an explicit float64 loop."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import causal_conv1d, causal_conv1d_step
from tests.helpers import assert_close
from tests.test_sliding_window import FailOnHostRead


def loop_reference(x, weight, bias=None, initial_state=None):
    """y[:, t] = sum_i weight[:, i] * input(t - K + 1 + i) + bias, one output position at a time.

    input(p) is x[:, p] for p >= 0, initial_state[:, :, K + p] for p < 0 (its last entry is p = -1), else 0.
    Returns y and the last K inputs `[B, D, K]`, oldest first.
    """
    x, weight = x.double(), weight.double()
    B, T, D = x.shape
    K = weight.shape[1]

    def inp(p):
        if p >= 0:
            return x[:, p]
        if initial_state is not None:
            return initial_state.double()[:, :, K + p]
        return torch.zeros(B, D, dtype=torch.float64)

    ys = []
    for t in range(T):
        y = sum(weight[:, i] * inp(t - K + 1 + i) for i in range(K))
        ys.append(y if bias is None else y + bias.double())
    state = torch.stack([inp(p) for p in range(T - K, T)], dim=-1)
    return torch.stack(ys, dim=1), state


# Read these by key: hypothesis does not keep the dictionaries' key order.
shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.sampled_from([1, 2, 3, 63, 130]) | st.integers(1, 150),
    "D": st.sampled_from([1, 5, 16, 112]),
    "K": st.sampled_from([1, 3, 4]) | st.integers(1, 8),
})


def _shape(shape):
    return (shape[key] for key in ("B", "T", "D", "K"))


@given(shape=shapes, with_bias=st.booleans(), with_state=st.booleans(), transposed=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_forward_state_and_gradients_match_loop(shape, with_bias, with_state, transposed, dtype):
    B, T, D, K = _shape(shape)
    x = torch.randn(B, T, D, dtype=dtype)
    if transposed:  # non-contiguous input
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight = torch.randn(D, K, dtype=dtype)
    bias = torch.randn(D, dtype=dtype) if with_bias else None
    state = torch.randn(B, D, K, dtype=dtype) if with_state else None
    inputs = [t for t in (x, weight, bias, state) if t is not None]
    for t in inputs:
        t.requires_grad_()

    y, new_state = causal_conv1d(x, weight, bias, initial_state=state, return_state=True)
    assert y.dtype == dtype and y.shape == (B, T, D) and new_state.shape == (B, D, K)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(leaves)
    y_ref, state_ref = loop_reference(next(it), next(it), next(it) if with_bias else None,
                                      next(it) if with_state else None)
    assert_close(y, y_ref, dtype)
    assert_close(new_state, state_ref, dtype, "returned state")

    dy = torch.randn_like(y_ref)
    # With K = 1 the state never reaches y: its gradient is then zero, not an error.
    grads = torch.autograd.grad(y, inputs, dy.to(dtype), materialize_grads=True)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy, materialize_grads=True)
    names = ["x", "weight"] + ["bias"] * with_bias + ["initial_state"] * with_state
    for name, g, g_ref in zip(names, grads, grads_ref):
        # The oldest state entry never reaches the output: its gradient is exactly zero on both sides.
        if name == "initial_state":
            assert torch.equal(g[..., 0], torch.zeros_like(g[..., 0]))
            g, g_ref = g[..., 1:], g_ref[..., 1:]
        if g_ref.numel():
            assert_close(g, g_ref, dtype, f"d{name}")


@given(shape=shapes, split=st.floats(0.0, 1.0), with_bias=st.booleans())
def test_split_with_state_equals_whole(shape, split, with_bias):
    B, T, D, K = _shape(shape)
    x = torch.randn(B, T + 1, D, dtype=torch.float64)
    weight, bias = torch.randn(D, K, dtype=torch.float64), torch.randn(D, dtype=torch.float64) if with_bias else None
    cut = 1 + int((T - 1) * split)  # both chunks non-empty; the first may be shorter than K
    whole, whole_state = causal_conv1d(x, weight, bias, return_state=True)
    first, state = causal_conv1d(x[:, :cut], weight, bias, return_state=True)
    second, final_state = causal_conv1d(x[:, cut:], weight, bias, initial_state=state, return_state=True)
    assert_close(torch.cat([first, second], 1), whole, torch.float64)
    assert_close(final_state, whole_state, torch.float64, "state")


@settings(max_examples=15)
@given(shape=shapes, with_bias=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_steps_match_parallel_at_every_position(shape, with_bias, dtype):
    B, T, D, K = _shape(shape)
    T = min(T, 40)
    x = torch.randn(B, T, D, dtype=dtype)
    weight, bias = torch.randn(D, K, dtype=dtype), torch.randn(D, dtype=dtype) if with_bias else None
    # The state is kept in the accumulation dtype: fp32, fp64 for fp64 inputs.
    initial_state = torch.randn(B, D, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y_ref, state_ref = loop_reference(x, weight, bias, initial_state)

    conv_state = initial_state.clone()
    ys = [causal_conv1d_step(x[:, t], conv_state, weight, bias) for t in range(T)]
    assert all(y.dtype == dtype for y in ys)
    # Compared as one sequence: a single near-zero output would make a per-position relative error noisy.
    assert_close(torch.stack(ys, 1), y_ref, dtype, "steps")
    assert_close(conv_state, state_ref, dtype, "state after steps")


def test_step_never_reads_a_value_on_host():
    x, state, weight, bias = torch.randn(2, 4), torch.randn(2, 4, 3), torch.randn(4, 3), torch.randn(4)
    with FailOnHostRead():
        causal_conv1d_step(x, state, weight, bias)
    assert torch.equal(state[..., -1], x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x, weight = torch.randn(2, 50, 8, dtype=dtype), torch.randn(8, 3, dtype=dtype)
    y, state = causal_conv1d(x, weight, return_state=True)
    assert y.dtype == dtype and state.dtype == torch.float32
    assert_close(y, loop_reference(x, weight)[0], dtype)


# ---- bad input -----------------------------------------------------------------------------------------------

def _args():
    return torch.randn(2, 5, 4), torch.randn(4, 3), torch.randn(4), torch.randn(2, 4, 3)


@pytest.mark.parametrize("make, error, words", [
    (lambda x, w, b, s: (x[0], w, b, s), ValueError, "x must have 3 dimensions"),
    (lambda x, w, b, s: ([1.0], w, b, s), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b, s: (x, w[:, None], b, s), ValueError, "weight must have 2 dimensions"),
    (lambda x, w, b, s: (x, w[:3], b, s), ValueError, "channels of x and weight"),
    (lambda x, w, b, s: (x, w[:, :0], b, s), ValueError, "weight must not have empty dimensions"),
    (lambda x, w, b, s: (x, w, b[:3], s), ValueError, r"bias must have shape \(4,\)"),
    (lambda x, w, b, s: (x, w, b[None], s), ValueError, "bias must have 1 dimensions"),
    (lambda x, w, b, s: (x, w, b, s[:1]), ValueError, r"initial_state must have shape \(2, 4, 3\)"),
    (lambda x, w, b, s: (x, w, b, s[..., :2]), ValueError, "initial_state must have shape"),
    (lambda x, w, b, s: (x, w, b, s[0]), ValueError, "initial_state must have 3 dimensions"),
    (lambda x, w, b, s: (x[:, :0], w, b, s), ValueError, "x must not have empty dimensions"),
    (lambda x, w, b, s: (x.int(), w, b, s), TypeError, "x has dtype int32"),
    (lambda x, w, b, s: (x, w.long(), b, s), TypeError, "weight has dtype int64"),
    (lambda x, w, b, s: (x, w.to("meta"), b, s), ValueError, "weight on meta"),
    (lambda x, w, b, s: (x, w, b.to("meta"), s), ValueError, "bias on meta"),
    (lambda x, w, b, s: (x, w, b, s.to("meta")), ValueError, "initial_state on meta"),
])
def test_bad_inputs_raise(make, error, words):
    x, w, b, s = make(*_args())
    with pytest.raises(error, match=words):
        causal_conv1d(x, w, b, initial_state=s)


@pytest.mark.parametrize("make, error, words", [
    (lambda x, w, b, s: (x, s, w, b), ValueError, "x must have 2 dimensions"),
    (lambda x, w, b, s: (x[:, 0], s[:1], w, b), ValueError, r"conv_state must have shape \(2, 4, 3\)"),
    (lambda x, w, b, s: (x[:, 0], s[..., :2], w, b), ValueError, "conv_state must have shape"),
    (lambda x, w, b, s: (x[:, 0], s.int(), w, b), TypeError, "conv_state has dtype int32"),
    (lambda x, w, b, s: (x[:, 0], s.to("meta"), w, b), ValueError, "conv_state on meta"),
    (lambda x, w, b, s: (x[:, 0], s, w[:2], b), ValueError, "channels of x and weight"),
])
def test_bad_step_inputs_raise(make, error, words):
    with pytest.raises(error, match=words):
        causal_conv1d_step(*make(*_args()))


def test_bad_backend_raises():
    x, w, b, s = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_conv1d(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        causal_conv1d(x, w, backend="cuda")
