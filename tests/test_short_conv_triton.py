"""The Triton short-conv decode step (plain and gated) against the float64 reference.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by .ci/run before triton is
imported); on a GPU the gpu-marked tests run it compiled. The kernel tests NaN-fill fresh allocations, so
an output element the kernel forgets to write fails the comparison. The bad-input tests need neither.
"""
import itertools
import os

import pytest
import torch

from based.nn import BaseConv
from based.ops import causal_conv1d_step, gated_conv1d_step
from based.ops._backend import triton_available
from tests.helpers import assert_close
from tests.test_nn import decode_in_chunks, randomized

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")
interpreter_only = pytest.mark.skipif(not (INTERPRETED and triton_available()),
                                      reason="set TRITON_INTERPRET=1 (with triton installed) to run the kernel on CPU")
nan_filled = pytest.mark.usefixtures("nan_filled_allocations")


def random_step_inputs(steps, B, D, K, dtype, with_bias, device):
    """x and gate for each step `[steps, B, D]`, weight `[D, K]`, bias `[D]` or None, fp32 state `[B, D, K]`."""
    x, gate = (torch.randn(steps, B, D, dtype=dtype, device=device) for _ in range(2))
    weight = torch.randn(D, K, dtype=dtype, device=device)
    bias = torch.randn(D, dtype=dtype, device=device) if with_bias else None
    return x, gate, weight, bias, torch.randn(B, D, K, device=device)


def step(gated, x, gate, state, weight, bias, backend):
    if gated:
        return gated_conv1d_step(x, gate, state, weight, bias, backend=backend)
    return causal_conv1d_step(x, state, weight, bias, backend=backend)


def check_steps(B, D, K, dtype, gated, with_bias, device, steps=4):
    """Consecutive Triton steps against the float64 reference; the fp32 state must come out bit for bit as
    the torch backend leaves it on the same inputs (the update is a shift and a cast, no arithmetic)."""
    x, gate, weight, bias, state = random_step_inputs(steps, B, D, K, dtype, with_bias, device)
    state_torch, state64 = state.clone(), state.double()
    bias64 = None if bias is None else bias.double()
    outs, refs = [], []
    for t in range(steps):
        outs.append(step(gated, x[t], gate[t], state, weight, bias, "triton"))
        step(gated, x[t], gate[t], state_torch, weight, bias, "torch")
        refs.append(step(gated, x[t].double(), gate[t].double(), state64, weight.double(), bias64, "torch"))
        assert torch.equal(state, state_torch), f"state after step {t}"
    assert outs[0].dtype == dtype and outs[0].shape == (B, D)
    # Compared as one sequence: a single near-zero output would make a per-step relative error noisy.
    assert_close(torch.stack(outs), torch.stack(refs), dtype, "steps")


# (gated, with_bias, dtype)
STEP_CASES = list(itertools.product([False, True], [False, True], [torch.float32, torch.bfloat16]))


@interpreter_only
@nan_filled
@pytest.mark.parametrize("K", [1, 3, 4])
@pytest.mark.parametrize("D", [1, 7, 64, 130])
@pytest.mark.parametrize("gated, with_bias, dtype", STEP_CASES)
def test_interpreted_steps_match_reference(gated, with_bias, dtype, D, K):
    check_steps(2, D, K, dtype, gated, with_bias, "cpu")


@interpreter_only
@nan_filled
def test_interpreted_step_takes_strided_inputs():
    """BaseConv hands over x and gate as halves of one projection; the state and weight may be transposed."""
    B, D, K = 3, 130, 3
    x, gate = torch.randn(B, 2 * D).split(D, dim=-1)
    weight = torch.randn(K, D).t()
    state = torch.randn(B, K, D).transpose(1, 2)
    state_torch = state.contiguous()
    out = gated_conv1d_step(x, gate, state, weight, backend="triton")
    ref = gated_conv1d_step(x.contiguous(), gate.contiguous(), state_torch, weight.contiguous(), backend="torch")
    assert_close(out, ref, torch.float32)
    assert torch.equal(state, state_torch)


@interpreter_only
@pytest.mark.parametrize("gated", [False, True])
def test_interpreted_custom_op_passes_opcheck(gated):
    """Schema (conv_state mutated, output not aliased) and fake impl, as torch.compile needs them."""
    import based.ops.short_conv.triton_step  # noqa: F401, PLC0415 (registers the op)

    x, gate, weight, bias, state = random_step_inputs(1, 2, 130, 3, torch.bfloat16, True, "cpu")
    torch.library.opcheck(torch.ops.based.causal_conv1d_step, (x[0], state, weight, bias, gate[0] if gated else None))


@needs_triton
def test_triton_backend_rejects_what_it_cannot_run():
    x, gate, weight, _, state = random_step_inputs(1, 2, 4, 3, torch.float64, False, "cpu")
    if INTERPRETED:
        with pytest.raises(TypeError, match="takes float16, bfloat16 or float32"):
            gated_conv1d_step(x[0], gate[0], state, weight, backend="triton")
    else:
        with pytest.raises(ValueError, match="cannot run on cpu"):
            causal_conv1d_step(x[0], state, weight, backend="triton")


# ---- bad input (checked before any backend runs) -------------------------------------------------------------

def _gated_args():
    return torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4, 3), torch.randn(4, 3), torch.randn(4)


@pytest.mark.parametrize("make, error, words", [
    (lambda x, g, s, w, b: (x, g[:1], s, w, b), ValueError, r"gate must have x's shape \(2, 4\), got \(1, 4\)"),
    (lambda x, g, s, w, b: (x, g[:, :3], s, w, b), ValueError, r"gate must have x's shape \(2, 4\)"),
    (lambda x, g, s, w, b: (x, g[..., None], s, w, b), ValueError, "gate must have 2 dimensions"),
    (lambda x, g, s, w, b: (x, g.double(), s, w, b), TypeError, "gate must have x's dtype torch.float32"),
    (lambda x, g, s, w, b: (x, g.bfloat16(), s, w, b), TypeError, "got torch.bfloat16"),
    (lambda x, g, s, w, b: (x, g.int(), s, w, b), TypeError, "gate has dtype int32"),
    (lambda x, g, s, w, b: (x, [1.0], s, w, b), TypeError, "gate must be a torch.Tensor"),
    (lambda x, g, s, w, b: (x, g.to("meta"), s, w, b), ValueError, "gate on meta"),
    (lambda x, g, s, w, b: (x[None], g, s, w, b), ValueError, "x must have 2 dimensions"),
    (lambda x, g, s, w, b: (x, g, s[..., :2], w, b), ValueError, r"conv_state must have shape \(2, 4, 3\)"),
    (lambda x, g, s, w, b: (x, g, s.to("meta"), w, b), ValueError, "conv_state on meta"),
    (lambda x, g, s, w, b: (x, g, s, w[:2], b), ValueError, "channels of x and weight"),
    (lambda x, g, s, w, b: (x, g, s, w, b[:3]), ValueError, r"bias must have shape \(4,\)"),
])
def test_bad_gated_step_inputs_raise(make, error, words):
    with pytest.raises(error, match=words):
        gated_conv1d_step(*make(*_gated_args()))


def test_bad_gated_step_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_conv1d_step(*_gated_args(), backend="cudnn")
    with pytest.raises(ValueError, match="gated_conv1d_step has no 'cuda' backend"):
        gated_conv1d_step(*_gated_args(), backend="cuda")


# ---- GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_triton
@nan_filled
@pytest.mark.parametrize("K", [1, 3, 4])
@pytest.mark.parametrize("D", [1, 7, 64, 130, 2048, 3584])
@pytest.mark.parametrize("gated, with_bias, dtype", STEP_CASES + [(True, False, torch.float16)])
def test_gpu_steps_match_reference(gated, with_bias, dtype, D, K):
    check_steps(3, D, K, dtype, gated, with_bias, "cuda", steps=5)


@pytest.mark.gpu
@needs_triton
@nan_filled
@pytest.mark.parametrize("gated", [False, True])
def test_gpu_steps_replay_from_a_cuda_graph(gated):
    """One step captured with backend "auto" (the Triton kernel on CUDA), replayed with each new token
    copied into the captured inputs, as generation does."""
    steps, B, D, K, dtype = 5, 4, 2048, 3, torch.bfloat16
    x, gate, weight, bias, state = random_step_inputs(steps, B, D, K, dtype, True, "cuda")
    state_torch, state64 = state.clone(), state.double()
    static_x, static_gate = x[0].clone(), gate[0].clone()
    # Capture needs the kernel compiled beforehand: warm up on a side stream, then undo the warm-up's step.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(gated, static_x, static_gate, state.clone(), weight, bias, "auto")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(gated, static_x, static_gate, state, weight, bias, "auto")

    outs, refs = [], []
    for t in range(steps):
        static_x.copy_(x[t])
        static_gate.copy_(gate[t])
        graph.replay()
        outs.append(static_out.clone())
        step(gated, x[t], gate[t], state_torch, weight, bias, "torch")
        refs.append(step(gated, x[t].double(), gate[t].double(), state64, weight.double(), bias.double(), "torch"))
        assert torch.equal(state, state_torch), f"state after replay {t}"
    assert_close(torch.stack(outs), torch.stack(refs), dtype, "replayed steps")


@pytest.mark.gpu
@needs_triton
@nan_filled
def test_gpu_step_compiles_without_graph_breaks():
    x, gate, weight, bias, state = random_step_inputs(3, 2, 2048, 3, torch.bfloat16, True, "cuda")
    state_torch = state.clone()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, g, s: gated_conv1d_step(x, g, s, weight, bias) * 2, fullgraph=True)
    for t in range(3):
        out = compiled(x[t], gate[t], state)
        ref = step(True, x[t], gate[t], state_torch, weight, bias, "torch") * 2
        assert_close(out, ref, torch.bfloat16, f"step {t}")
        assert torch.equal(state, state_torch), f"state after step {t}"


# Not NaN-filled: deterministic mode makes cuBLAS (the layer's projections) demand CUBLAS_WORKSPACE_CONFIG.
@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_gpu_base_conv_decoding_matches_parallel_forward(dtype):
    """Token-by-token decoding through the fused gated step against the layer's parallel forward."""
    torch.manual_seed(0)
    layer = randomized(BaseConv(256, expand_proj=4, kernel_size=3), dtype).cuda()
    x = torch.randn(3, 40, 256, dtype=dtype, device="cuda")
    decoded, cache = decode_in_chunks(layer, x, [1] * 40)
    assert decoded.dtype == dtype and cache.dtype == torch.float32
    assert_close(decoded, layer(x), dtype)
