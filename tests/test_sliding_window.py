"""Sliding-window attention and its ring-buffer cache against a full T x T masked softmax in float64."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from based.ops import (
    WindowCache,
    sliding_window_attention,
    sliding_window_attention_step,
    window_cache_read,
    window_cache_write,
)
from tests.helpers import assert_close, largest_intermediate


def full_reference(q, k, v, window, scale=None):
    """softmax over keys p - window < j <= p (p = i + Tk - Tq) of the full Tq x Tk scores, float64."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, H, Tk, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)  # query head h reads kv head h // (H // Hkv)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    p = torch.arange(Tq, device=q.device)[:, None] + Tk - Tq
    j = torch.arange(Tk, device=q.device)[None, :]
    s = s.masked_fill(~((j <= p) & (j > p - window)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


class FailOnHostRead(TorchDispatchMode):
    """Fails on any read of a tensor value by the host (.item(), int(), bool(), Python indexing).

    Such a read syncs with the GPU and cannot happen inside CUDA-graph capture; decode steps must avoid it.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor value was read on the host")
        return func(*args, **(kwargs or {}))


def random_qkv(B, Tq, Tk, H, Hkv, D, Dv, dtype, requires_grad=False):
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, Dv, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


# Read these by key: hypothesis does not keep the dictionaries' key order.
shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.sampled_from([1, 2, 63, 64, 65, 130]) | st.integers(1, 150),
    "Hkv": st.integers(1, 2),
    "groups": st.sampled_from([1, 1, 2, 3]),  # 1 = MHA, else GQA
    "D": st.sampled_from([1, 8, 16, 112]),
    "Dv": st.sampled_from([1, 7, 16, 112]),
})
windows = st.sampled_from([1, 2, 16, 129, 200]) | st.integers(1, 160)


@given(shape=shapes, window=windows, query_fraction=st.floats(0.0, 1.0), scale=st.sampled_from([None, 0.3]),
       dtype=st.sampled_from([torch.float64, torch.float32]), data=st.data())
def test_forward_and_gradients_match_full_softmax(shape, window, query_fraction, scale, dtype, data):
    B, T, Hkv, G, D, Dv = (shape[key] for key in ("B", "T", "Hkv", "groups", "D", "Dv"))
    # Tq <= Tk: the queries are the last Tq positions (continuing from cached keys).
    Tq = max(1, round(T * query_fraction))
    q, k, v = random_qkv(B, Tq, T, G * Hkv, Hkv, D, Dv, dtype, requires_grad=True)
    # Non-contiguous inputs must work too.
    if data.draw(st.booleans(), label="transposed q"):
        q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    out = sliding_window_attention(q, k, v, window=window, scale=scale)
    assert out.dtype == dtype and out.shape == (B, Tq, G * Hkv, Dv)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = full_reference(*leaves, window, scale)
    assert_close(out, ref, dtype)

    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    grads_ref = torch.autograd.grad(ref, leaves, do)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close(g, g_ref, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = random_qkv(2, 100, 100, 4, 2, 16, 16, dtype)
    out = sliding_window_attention(q, k, v, window=17)
    assert out.dtype == dtype
    assert_close(out, full_reference(q, k, v, 17), dtype)


def test_memory_is_linear_in_sequence_length():
    T, window = 32768, 129
    q, k, v = random_qkv(1, T, T, 1, 1, 4, 4, torch.float32)
    largest = largest_intermediate(sliding_window_attention, q, k, v, window=window)
    assert largest < 4 * T * window, f"an intermediate of {largest} elements for T={T}: O(T^2) memory"


# ---- decode: ring-buffer cache ------------------------------------------------------------------------------

step_shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "T": st.integers(1, 40),
    "Hkv": st.integers(1, 2),
    "groups": st.sampled_from([1, 2]),
    "D": st.sampled_from([1, 8, 12]),
    "Dv": st.sampled_from([1, 5, 8]),
    "window": st.sampled_from([1, 2, 3, 7]) | st.integers(1, 50),
})


@settings(max_examples=15)
@given(shape=step_shapes, tensor_pos=st.booleans(), prompt_fraction=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_prefill_then_steps_match_parallel_at_every_position(shape, tensor_pos, prompt_fraction, dtype):
    """window_cache_write of a prompt, then one step per token (int or tensor pos); the ring wraps."""
    B, T, Hkv, G, D, Dv, W = (shape[key] for key in ("B", "T", "Hkv", "groups", "D", "Dv", "window"))
    q, k, v = random_qkv(B, T, T, G * Hkv, Hkv, D, Dv, dtype)
    ref = full_reference(q, k, v, W)
    P = int(T * prompt_fraction)  # prompt length, may be 0 (pure decode) or longer than the window

    cache = WindowCache.zeros(B, W, Hkv, D, value_dim=Dv, dtype=dtype)
    if P:
        window_cache_write(cache, k[:, :P], v[:, :P], torch.tensor(0) if tensor_pos else 0)
    pos = torch.tensor(P) if tensor_pos else P
    outs = []
    for t in range(P, T):
        outs.append(sliding_window_attention_step(q[:, t], k[:, t], v[:, t], cache, pos))
        if tensor_pos:
            pos += 1  # in place, as a CUDA-graph replay would
        else:
            pos = pos + 1
    if outs:
        assert outs[0].dtype == dtype
        # Compared as one sequence: a single near-zero output would make a per-position relative error noisy.
        assert_close(torch.stack(outs, 1), ref[:, P:], dtype, "steps")
    # Memory stays O(window): the cache never grows.
    assert cache.k.shape == (B, W, Hkv, D) and cache.v.shape == (B, W, Hkv, Dv)


@settings(max_examples=15)
@given(shape=step_shapes, cuts=st.lists(st.floats(0.0, 1.0), max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_chunked_prefill_with_cache_read_matches_parallel(shape, cuts, dtype):
    """Each chunk attends over window_cache_read(...) + its own keys (Tq < Tk), then is written."""
    B, T, Hkv, G, D, Dv, W = (shape[key] for key in ("B", "T", "Hkv", "groups", "D", "Dv", "window"))
    q, k, v = random_qkv(B, T, T, G * Hkv, Hkv, D, Dv, dtype)
    ref = full_reference(q, k, v, W)
    bounds = sorted({0, T, *(int(T * c) for c in cuts)})

    cache = WindowCache.zeros(B, W, Hkv, D, value_dim=Dv, dtype=dtype)
    for start, end in zip(bounds, bounds[1:]):
        k_old, v_old = window_cache_read(cache, start)
        assert k_old.shape == (B, min(start, W), Hkv, D)
        k_all, v_all = torch.cat([k_old, k[:, start:end]], 1), torch.cat([v_old, v[:, start:end]], 1)
        out = sliding_window_attention(q[:, start:end], k_all, v_all, window=W)
        assert_close(out, ref[:, start:end], dtype, f"chunk {start}:{end}")
        window_cache_write(cache, k[:, start:end], v[:, start:end], start)
    k_last, v_last = window_cache_read(cache, T)
    assert_close(k_last, k[:, max(0, T - W):], dtype, "cached keys")
    assert_close(v_last, v[:, max(0, T - W):], dtype, "cached values")


def test_step_with_tensor_pos_never_reads_a_value_on_host():
    """A host read (.item(), int(), bool() of a tensor) syncs with the GPU and breaks CUDA-graph capture."""
    q, k, v = random_qkv(1, 1, 1, 2, 1, 4, 4, torch.float32)
    cache, pos = WindowCache.zeros(1, 3, 1, 4), torch.tensor(5)
    with FailOnHostRead():
        out = sliding_window_attention_step(q[:, 0], k[:, 0], v[:, 0], cache, pos)
        window_cache_write(cache, k, v, pos)
    assert torch.isfinite(out).all()
    assert torch.equal(cache.k[:, 5 % 3], k[:, 0])


def test_cache_zeros_and_write_keeps_last_window():
    cache = WindowCache.zeros(2, 4, 3, 8, value_dim=5, dtype=torch.float64)
    assert cache.k.shape == (2, 4, 3, 8) and cache.v.shape == (2, 4, 3, 5) and cache.window == 4
    k, v = torch.randn(2, 10, 3, 8, dtype=torch.float64), torch.randn(2, 10, 3, 5, dtype=torch.float64)
    window_cache_write(cache, k, v, 7)  # positions 7..16; 13..16 survive, position p in slot p % 4
    for p in range(13, 17):
        assert torch.equal(cache.k[:, p % 4], k[:, p - 7]) and torch.equal(cache.v[:, p % 4], v[:, p - 7])


# ---- bad input -----------------------------------------------------------------------------------------------

def _qkv():
    return random_qkv(1, 4, 6, 4, 2, 8, 5, torch.float32)


@pytest.mark.parametrize("make, error, words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[0], v), ValueError, "k must have 4 dimensions"),
    (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), ValueError, "batch and head dim of q and k"),
    (lambda q, k, v: (q, k, v[:, :5]), ValueError, "seqlen and heads of k and v"),
    (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "heads of k and v"),
    (lambda q, k, v: (q, k[..., :7], v), ValueError, "head dim of q and k"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "heads of q must be a multiple"),
    (lambda q, k, v: (torch.cat([q, q], 1), k, v), ValueError, "seqlen of q must be <= seqlen of k"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "q must not have empty"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "k has dtype int32"),
    (lambda q, k, v: (q.double(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v on meta"),
    (lambda q, k, v: (q.to("meta"), k, v), ValueError, "q on meta"),
])
def test_bad_inputs_raise(make, error, words):
    with pytest.raises(error, match=words):
        sliding_window_attention(*make(*_qkv()), window=3)


@pytest.mark.parametrize("window, error, words", [
    (0, ValueError, "window must be >= 1"),
    (-2, ValueError, "window must be >= 1"),
    (2.0, TypeError, "window must be an int"),
    (True, TypeError, "window must be an int"),
])
def test_bad_window_raises(window, error, words):
    with pytest.raises(error, match=words):
        sliding_window_attention(*_qkv(), window=window)


def test_bad_scale_and_backend_raise():
    with pytest.raises(TypeError, match="scale must be a real number"):
        sliding_window_attention(*_qkv(), window=3, scale="0.1")
    with pytest.raises(ValueError, match="backend must be one of"):
        sliding_window_attention(*_qkv(), window=3, backend="flash")
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        sliding_window_attention(*_qkv(), window=3, backend="cuda")


def test_bad_cache_and_pos_raise():
    q, k, v = (x[:, 0] for x in _qkv())  # [1, 4, 8], [1, 2, 8], [1, 2, 5]
    good = WindowCache.zeros(1, 3, 2, 8, value_dim=5)
    step = sliding_window_attention_step
    with pytest.raises(ValueError, match=r"cache.k must have shape \(1, 3, 2, 8\)"):
        step(q, k, v, WindowCache.zeros(1, 3, 2, 7, value_dim=5), 0)
    with pytest.raises(ValueError, match=r"cache.v must have shape \(1, 3, 2, 5\)"):
        step(q, k, v, WindowCache.zeros(1, 3, 2, 8, value_dim=4), 0)
    with pytest.raises(ValueError, match="cache.v must have shape"):
        step(q, k, v, WindowCache(good.k, good.v[:, :2]), 0)
    with pytest.raises(ValueError, match="cache.k must have 4 dimensions"):
        step(q, k, v, WindowCache(good.k[0], good.v), 0)
    with pytest.raises(ValueError, match="cache.k must not have empty dimensions"):
        step(q, k, v, WindowCache.zeros(1, 0, 2, 8, value_dim=5), 0)
    with pytest.raises(TypeError, match="cache.k has dtype int32"):
        step(q, k, v, WindowCache(good.k.int(), good.v), 0)
    with pytest.raises(TypeError, match="cache must be a WindowCache"):
        step(q, k, v, (good.k, good.v), 0)
    with pytest.raises(ValueError, match="cache.k on meta"):
        step(q, k, v, WindowCache(good.k.to("meta"), good.v), 0)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        step(q[None], k, v, good, 0)
    with pytest.raises(ValueError, match="pos must be >= 0"):
        step(q, k, v, good, -1)
    with pytest.raises(TypeError, match="pos must be an int"):
        step(q, k, v, good, 1.0)
    with pytest.raises(TypeError, match="pos must be a 0-dim int64 tensor"):
        step(q, k, v, good, torch.tensor([1]))
    with pytest.raises(TypeError, match="pos must be a 0-dim int64 tensor"):
        step(q, k, v, good, torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="pos on meta"):
        step(q, k, v, good, torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="pos must be a Python int"):
        window_cache_read(good, torch.tensor(1))
    with pytest.raises(ValueError, match="pos must be >= 0"):
        window_cache_read(good, -3)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        window_cache_write(good, k, v, 0)
    with pytest.raises(ValueError, match=r"cache.k must have shape \(2, 3, 2, 8\)"):
        window_cache_write(good, torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 5), 0)
