"""The Triton sliding-window kernels (forward, backward, decode) against the float64 masked softmax.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by .ci/run before triton is imported);
on a GPU the gpu-marked tests run them compiled. Fresh allocations are NaN-filled, so an element a kernel
forgets to write fails the comparison.
"""
import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import WindowCache, sliding_window_attention, sliding_window_attention_step, window_cache_write
from tests.helpers import TOLERANCE, assert_close
from tests.test_sliding_window import full_reference, random_qkv

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernels on CPU")


def check_parallel(B, Tq, Tk, H, Hkv, D, Dv, window, dtype, device):
    """Output and the gradients of q, k, v of the Triton op against autograd of the float64 formula."""
    q, k, v = (x.to(device).requires_grad_() for x in random_qkv(B, Tq, Tk, H, Hkv, D, Dv, dtype))
    out = sliding_window_attention(q, k, v, window=window, backend="triton")
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = full_reference(*leaves, window)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    for name, g, g_ref in zip("qkv", grads, torch.autograd.grad(ref, leaves, do)):
        if g_ref.abs().max() < 1e-12:
            # Each query sees one key (T = 1 or window = 1): o = v, so dq and dk are exactly 0 and only an
            # absolute check makes sense (half precision leaves rounding residue of o - v).
            assert torch.isfinite(g).all() and g.abs().max() < TOLERANCE[dtype] * do.abs().max(), f"d{name}"
        else:
            assert_close(g, g_ref, dtype, f"d{name}")


def check_decode(B, T, H, Hkv, D, Dv, window, prompt, dtype, cache_dtype, device):
    """A prompt written into the ring, then one Triton step per token (tensor pos, advanced in place as a
    CUDA-graph replay would) against the parallel formula at every position."""
    q, k, v = (x.to(device) for x in random_qkv(B, T, T, H, Hkv, D, Dv, dtype))
    ref = full_reference(q, k, v, window)
    cache = WindowCache.zeros(B, window, Hkv, D, value_dim=Dv, device=device, dtype=cache_dtype)
    if prompt:
        window_cache_write(cache, k[:, :prompt], v[:, :prompt], 0)
    pos = torch.tensor(prompt, device=device)
    outs = []
    for t in range(prompt, T):
        outs.append(sliding_window_attention_step(q[:, t], k[:, t], v[:, t], cache, pos, backend="triton"))
        pos += 1
    assert outs[0].dtype == dtype
    assert_close(torch.stack(outs, 1), ref[:, prompt:], dtype, "steps")


@interpreter_only
@settings(max_examples=10)
@given(T=st.sampled_from([1, 63, 130]), query_fraction=st.sampled_from([1.0, 0.5]),
       window=st.sampled_from([1, 7, 64, 200]), groups=st.sampled_from([1, 2]), D=st.sampled_from([16, 24]),
       Dv=st.sampled_from([64, 24]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_interpreted_kernels_match_reference(T, query_fraction, window, groups, D, Dv, dtype):
    check_parallel(1, max(1, int(T * query_fraction)), T, 2 * groups, 2, D, Dv, window, dtype, "cpu")


@interpreter_only
def test_interpreted_kernels_take_non_contiguous_inputs():
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(2, 70, 70, 4, 2, 16, 16, torch.float32))
    assert not q.is_contiguous()
    out = sliding_window_attention(q, k, v, window=9, backend="triton")
    assert_close(out, full_reference(q, k, v, 9), torch.float32)


@interpreter_only
@settings(max_examples=6)
@given(T=st.integers(1, 40), window=st.sampled_from([1, 3, 16, 50]), groups=st.sampled_from([1, 3]),
       prompt_fraction=st.floats(0.0, 0.9), cache_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_interpreted_decode_matches_parallel(T, window, groups, prompt_fraction, cache_dtype):
    dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    check_decode(2, T, 2 * groups, 2, 16, 24, window, int(T * prompt_fraction), dtype, cache_dtype, "cpu")


def test_triton_backend_rejects_what_it_cannot_run():
    q, k, v = random_qkv(1, 4, 4, 2, 1, 16, 16, torch.float64)
    if INTERPRETED or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with pytest.raises(TypeError, match="take float16, bfloat16 or float32"):
            sliding_window_attention(q.to(device), k.to(device), v.to(device), window=2, backend="triton")
    else:
        with pytest.raises(ValueError, match="cannot run on cpu"):
            sliding_window_attention(q, k, v, window=2, backend="triton")


# Every T x window x (MHA, GQA), with the (dtype, head dim) pairs taking turns so each pair appears too.
GPU_CASES = [
    (T, window, groups, *dtype_dim)
    for (T, window, groups), dtype_dim in zip(
        itertools.product([1, 63, 64, 65, 1000, 4096], [1, 7, 64, 129, 256, 5000], [1, 4]),
        itertools.cycle(itertools.product([torch.float32, torch.float16, torch.bfloat16], [64, 112, 128])))
]


@pytest.mark.gpu
@pytest.mark.parametrize("T, window, groups, dtype, D", GPU_CASES)
def test_gpu_kernels_match_reference(T, window, groups, dtype, D):
    check_parallel(2, T, T, 2 * groups, 2, D, D, window, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_continue_from_cached_keys(dtype):
    """Tq < Tk: queries aligned to the last keys, as a chunked prefill calls it."""
    check_parallel(2, 100, 700, 8, 2, 64, 64, 129, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window, groups, D", [(1, 1, 64), (7, 4, 112), (129, 1, 128), (129, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_matches_parallel_at_every_position(window, groups, D, dtype):
    check_decode(3, 300, 2 * groups, 2, D, D, window, 150, dtype, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton_and_compiles_without_graph_breaks():
    q, k, v = (x.cuda().requires_grad_() for x in random_qkv(2, 300, 300, 4, 2, 64, 64, torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: sliding_window_attention(q, k, v, window=129) * 2, fullgraph=True)
    out = compiled(q, k, v)
    assert_close(out, 2 * full_reference(q, k, v, 129), torch.bfloat16)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
