"""The fused Triton decode step of linear attention against the float64 reference step.

On CPU it runs in Triton's interpreter (TRITON_INTERPRET=1, set by .ci/run before triton is imported);
on a GPU the gpu-marked tests run it compiled. Outputs are NaN-prefilled (see conftest.py).
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import LinearAttentionState, linear_attention_step
from based.ops.linear_attention.reference import linear_attention_step_torch
from tests.helpers import assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


def check_steps(B, H, d, dv, dtype, normalize, steps, device, random_state=True):
    """`steps` consecutive Triton steps vs the reference on float64 copies: outputs (stacked), kv, ksum."""
    state = LinearAttentionState.zeros(B, H, d, dv, device=device)
    if random_state:  # a state after some earlier tokens: positive ksum, any kv
        state.kv.normal_()
        state.ksum.uniform_(0.5, 2.0)
    ref_state = LinearAttentionState(state.kv.double(), state.ksum.double())
    outs, refs = [], []
    for _ in range(steps):
        q, k = (torch.randn(B, H, d, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(B, H, dv, device=device, dtype=dtype)
        outs.append(linear_attention_step(q, k, v, state, normalize=normalize, backend="triton"))
        refs.append(linear_attention_step_torch(q.double(), k.double(), v.double(), ref_state, normalize, 1e-6))
    assert outs[0].dtype == dtype
    assert_close(torch.stack(outs), torch.stack(refs), dtype if dtype != torch.float32 else torch.float32)
    assert_close(state.kv, ref_state.kv, torch.float32, "kv")
    assert_close(state.ksum, ref_state.ksum, torch.float32, "ksum")


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=8)
@given(B=st.integers(1, 2), H=st.integers(1, 3), d=st.sampled_from([16, 8, 3]), dv=st.sampled_from([64, 24, 1]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), normalize=st.booleans(), random_state=st.booleans())
def test_interpreted_step_matches_reference(B, H, d, dv, dtype, normalize, random_state):
    check_steps(B, H, d, dv, dtype, normalize, 3, "cpu", random_state)


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
def test_interpreted_step_takes_strided_inputs():
    B, H, d, dv = 2, 3, 16, 32
    qkv = torch.randn(B, H, 2 * d + dv)  # q | k | v packed along the last dim, as one projection gives them
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    state = LinearAttentionState.zeros(B, H, d, dv)
    ref_state = LinearAttentionState.zeros(B, H, d, dv, dtype=torch.float64)
    out = linear_attention_step(q, k, v, state, backend="triton")
    ref = linear_attention_step_torch(q.double(), k.double(), v.double(), ref_state, True, 1e-6)
    assert_close(out, ref, torch.float32)


def test_triton_step_rejects_what_it_cannot_run():
    q, k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 8)
    if INTERPRETED or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        E = 153
        kv_value_major = torch.zeros(1, 2, 8, E, device=device).transpose(-1, -2)  # value dim not unit-stride
        state = LinearAttentionState(kv_value_major, torch.zeros(1, 2, E, device=device))
        with pytest.raises(ValueError, match="state.kv is updated in place"):
            linear_attention_step(q.to(device), k.to(device), v.to(device), state, backend="triton")
        assert linear_attention_step(q.to(device), k.to(device), v.to(device), state).shape == (1, 2, 8)  # auto
        with pytest.raises(TypeError, match="take float16, bfloat16 or float32"):
            state64 = LinearAttentionState.zeros(1, 2, 16, 8, device=device, dtype=torch.float64)
            linear_attention_step(q.double().to(device), k.double().to(device), v.double().to(device), state64,
                                  backend="triton")
    else:
        state = LinearAttentionState.zeros(1, 2, 16, 8)
        with pytest.raises(ValueError, match="cannot run on cpu"):
            linear_attention_step(q, k, v, state, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dv", [64, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_gpu_1000_steps_match_reference(dv, dtype, normalize):
    check_steps(3, 16, 16, dv, dtype, normalize, 1000, "cuda", random_state=False)


@pytest.mark.gpu
def test_gpu_step_replays_from_a_cuda_graph():
    B, H, d, dv = 4, 16, 16, 64
    state = LinearAttentionState.zeros(B, H, d, dv, device="cuda")
    q, k = (torch.randn(B, H, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, dv, device="cuda", dtype=torch.bfloat16)
    linear_attention_step(q, k, v, state)  # compile and build the tables outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_attention_step(q, k, v, state)
    ref_state = LinearAttentionState(state.kv.double(), state.ksum.double())
    ref = linear_attention_step_torch(q.double(), k.double(), v.double(), ref_state, True, 1e-6)
    graph.replay()
    assert_close(out, ref, torch.bfloat16)
    assert_close(state.kv, ref_state.kv, torch.float32, "kv")
