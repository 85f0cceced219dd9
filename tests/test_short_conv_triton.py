"""The Triton short-conv decode step (plain and gated) against the float64 reference.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by .ci/run before triton is
imported); on a GPU the gpu-marked tests run it compiled. The kernel tests NaN-fill fresh allocations, so
an output element the kernel forgets to write fails the comparison. The bad-input tests need neither.
"""
import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.nn import BaseConv
from based.ops import causal_conv1d, causal_conv1d_step, gated_conv1d, gated_conv1d_step, linear_gated_conv1d_step
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


# ---- linear_gated_conv1d_step: BaseConv's in_proj and gated conv step in one op --------------------------------

def linear_conv_formula(x, weight, bias, conv_state, conv_weight, norm_weight, eps=1e-5):
    """(output, advanced state) of BaseConv's in_proj + gated conv step, in float64."""
    x = x.double()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    u1, u2 = (x @ weight.double().T + (0 if bias is None else bias.double())).chunk(2, dim=-1)
    state = torch.cat([conv_state.double()[..., 1:], u1[..., None]], dim=-1)
    conv = (state * conv_weight.double()).sum(-1)
    return conv * torch.sigmoid(conv) * u2, state


def check_linear_conv(B, K, D, taps, dtype, with_bias, with_norm, backend, device, seed=0):
    """With a norm, x is the blocks' fp32 residual stream and the weights in `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(B, K, dtype=torch.float32 if with_norm and dtype != torch.float64 else dtype)
    weight = (randn(2 * D, K) / K**0.5).to(dtype)
    bias = randn(2 * D, dtype=dtype) if with_bias else None
    norm = dict(norm_weight=(1 + randn(K).abs()).to(dtype)) if with_norm else {}
    conv_state, conv_weight = randn(B, D, taps), randn(D, taps, dtype=dtype)
    expected, expected_state = linear_conv_formula(x, weight, bias, conv_state, conv_weight, norm.get("norm_weight"))
    out = linear_gated_conv1d_step(x, weight, bias, conv_state, conv_weight, backend=backend, **norm)
    assert out.shape == (B, D) and out.dtype == dtype
    assert_close(out, expected, dtype)
    assert_close(conv_state, expected_state, dtype, "conv state")


@pytest.mark.parametrize("B, taps", [(1, 1), (1, 3), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, with_norm", [(False, False), (True, True), (True, False)])
def test_linear_gated_conv_reference_matches_formula(B, taps, dtype, with_bias, with_norm):
    """The torch backend (the reference, also what "auto" takes on CPU and for several rows) at any batch."""
    check_linear_conv(B, 40, 24, taps, dtype, with_bias, with_norm, "torch", "cpu")


@interpreter_only
@nan_filled
@pytest.mark.parametrize("K, D", [(16, 24), (63, 130)])
@pytest.mark.parametrize("taps", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, with_norm", [(False, False), (True, True)])
def test_interpreted_linear_gated_conv_matches_formula(K, D, taps, dtype, with_bias, with_norm):
    """The Triton path (the GEMV kernel with the conv step fused) for one row, in the interpreter."""
    check_linear_conv(1, K, D, taps, dtype, with_bias, with_norm, "triton", "cpu")


@interpreter_only
def test_interpreted_linear_gated_conv_refuses_several_rows():
    with pytest.raises(ValueError, match="takes one row"):
        check_linear_conv(2, 16, 8, 3, torch.float32, False, False, "triton", "cpu")


@pytest.mark.gpu
@needs_triton
@nan_filled
@pytest.mark.parametrize("K, D, taps", [(63, 130, 3), (1792, 3584, 3), (1792, 3584, 4), (5000, 300, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, with_norm", [(False, False), (True, True)])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_linear_gated_conv_matches_formula(K, D, taps, dtype, with_bias, with_norm, backend):
    check_linear_conv(1, K, D, taps, dtype, with_bias, with_norm, backend, "cuda")


def _linear_conv_args():
    """x [1, 8], weight [6, 8] (D = 3), bias [6], conv_state [1, 3, 3], conv_weight [3, 3]."""
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, 8, generator=gen), weight=torch.randn(6, 8, generator=gen),
                bias=torch.randn(6, generator=gen), conv_state=torch.zeros(1, 3, 3), conv_weight=torch.zeros(3, 3))


@pytest.mark.parametrize("change, error, words", [
    (lambda a: dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (lambda a: dict(x=a["x"][0]), ValueError, "x must have 2 dimensions"),
    (lambda a: dict(x=a["x"][:0]), ValueError, r"x must not have empty dimensions, got shape \(0, 8\)"),
    (lambda a: dict(x=a["x"][:, :0], weight=a["weight"][:, :0]), ValueError, "x must not have empty dimensions"),
    (lambda a: dict(x=a["x"][:, :3]), ValueError, "must equal weight's in_features"),
    (lambda a: dict(x=a["x"].double()), TypeError, "must share a dtype"),
    (lambda a: dict(weight=a["weight"][:5], bias=None), ValueError, "even row count"),
    (lambda a: dict(weight=a["weight"][:0], bias=None), ValueError, "weight must not have empty dimensions"),
    (lambda a: dict(bias=a["bias"][:3]), ValueError, "bias must have shape"),
    (lambda a: dict(bias=a["bias"].double()), TypeError, "bias must have weight's dtype"),
    (lambda a: dict(conv_state=torch.zeros(2, 3, 3)), ValueError, r"conv_state must have shape \(1, 3, 3\)"),
    (lambda a: dict(conv_state=torch.zeros(3, 3)), ValueError, "conv_state must have 3 dimensions"),
    (lambda a: dict(conv_state=torch.zeros(1, 3, 0), conv_weight=torch.zeros(3, 0)), ValueError,
     "conv_state must not have empty dimensions"),
    (lambda a: dict(conv_state=torch.zeros(1, 3, 3, dtype=torch.int32)), TypeError, "conv_state has dtype int32"),
    (lambda a: dict(conv_weight=torch.zeros(3, 4)), ValueError, r"conv_weight must have shape \(3, 3\)"),
    (lambda a: dict(conv_weight=torch.zeros(3, 3, device="meta")), ValueError, "conv_weight on meta"),
    (lambda a: dict(norm_weight=torch.ones(5)), ValueError, "norm_weight must have shape"),
    (lambda a: dict(norm_weight=torch.ones(8), norm_eps=-1.0), ValueError, "norm_eps must be"),
    (lambda a: dict(backend="cudnn"), ValueError, "backend must be one of"),
    (lambda a: dict(backend="cuda"), ValueError, "linear_gated_conv1d_step has no 'cuda' backend"),
])
def test_bad_linear_gated_conv_inputs_raise(change, error, words):
    args = _linear_conv_args()
    args.update(change(args))
    with pytest.raises(error, match=words):
        linear_gated_conv1d_step(**args)


def direct_conv(x, weight, bias, state):
    """y_t = sum_i weight[:, i] x_{t-K+1+i} + bias in float64, inputs before the first token from `state`."""
    B, T, D = x.shape
    K = weight.shape[1]
    history = torch.cat([state.double() if state is not None else x.new_zeros(B, D, K, dtype=torch.float64),
                         x.double().transpose(1, 2)], dim=-1)
    y = torch.stack([sum(weight[:, i].double() * history[:, :, t + 1 + i] for i in range(K)) for t in range(T)], 1)
    return y + (bias.double() if bias is not None else 0), history[..., -K:]


def check_conv_kernels(B, T, D, K, dtype, with_bias, with_state, device, gated=False):
    """The Triton conv (gated: silu(conv(x)) * gate, with x and gate the strided halves of one projection, as
    BaseConv passes them) and its gradients against the direct formula in float64."""
    gen = torch.Generator(device).manual_seed(T * 100 + D)

    def randn(*size):
        return torch.randn(*size, device=device, generator=gen)

    if gated:
        projection = randn(B, T, 2 * D).to(dtype).requires_grad_()
        x, gate = projection.split(D, dim=-1)
    else:
        projection = x = randn(B, T, D).to(dtype).requires_grad_()
    weight = randn(D, K).to(dtype).requires_grad_()
    bias = randn(D).to(dtype).requires_grad_() if with_bias else None
    state = randn(B, D, K).requires_grad_() if with_state else None
    leaves = [t for t in (projection, weight, bias, state) if t is not None]
    if gated:
        y, new_state = gated_conv1d(x, gate, weight, bias, initial_state=state, return_state=True, backend="triton")
    else:
        y, new_state = causal_conv1d(x, weight, bias, initial_state=state, return_state=True, backend="triton")
    gy, gs = randn(B, T, D), randn(B, D, K)
    got = torch.autograd.grad((y.double() * gy).sum() + (new_state.double() * gs).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    p64, w64 = next(it), next(it)
    b64 = next(it) if with_bias else None
    s64 = next(it) if with_state else None
    x64, gate64 = p64.split(D, dim=-1) if gated else (p64, None)
    y_ref, state_ref = direct_conv(x64, w64, b64, s64)
    if gated:
        y_ref = y_ref * torch.sigmoid(y_ref) * gate64
    want = torch.autograd.grad((y_ref * gy).sum() + (state_ref * gs).sum(), leaves64)
    tolerance_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert_close(y, y_ref, tolerance_dtype, "y")
    assert_close(new_state, state_ref, tolerance_dtype, "state")
    for name, g, w, leaf in zip(("dx (and dgate)", "dweight", "dbias", "dstate"), got, want, leaves):
        assert g.dtype == leaf.dtype, name
        assert_close(g, w, tolerance_dtype, name)


@interpreter_only
@nan_filled
@settings(max_examples=20)
@given(T=st.sampled_from([1, 2, 5, 13]), D=st.sampled_from([3, 17]), K=st.sampled_from([3, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_bias=st.booleans(), with_state=st.booleans(),
       gated=st.booleans())
def test_interpreted_conv_kernels_match_direct_formula(T, D, K, dtype, with_bias, with_state, gated):
    check_conv_kernels(2, T, D, K, dtype, with_bias, with_state, "cpu", gated=gated)


@interpreter_only
def test_interpreted_gated_conv_ops_pass_opcheck():
    """Schemas and fake impls of the gated forward and its gate backward, as torch.compile needs them."""
    from based.ops.short_conv import triton_conv  # noqa: PLC0415 (registers the ops)

    gen = torch.Generator().manual_seed(0)
    x, gate, dy = (torch.randn(2, 5, 17, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    weight, bias = torch.randn(17, 3, generator=gen, dtype=torch.bfloat16), torch.randn(17, generator=gen)
    state = torch.randn(2, 17, 3, generator=gen)
    torch.library.opcheck(torch.ops.based.gated_conv1d, (x, gate, weight, bias.bfloat16(), state))
    torch.library.opcheck(torch.ops.based.gated_conv1d_gate_bwd, (x, gate, weight, None, None, dy))
    assert triton_conv.gated_conv1d_triton is not None


def test_gated_conv_reference_is_silu_of_conv_times_gate():
    """The torch backend, which "auto" takes: BaseConv's unfused forward, the conv rounded to x's dtype first."""
    gen = torch.Generator().manual_seed(0)
    x, gate = torch.randn(2, 9, 12, generator=gen, dtype=torch.bfloat16).split(6, dim=-1)
    weight, state = torch.randn(6, 3, generator=gen, dtype=torch.bfloat16), torch.randn(2, 6, 3, generator=gen)
    y, new_state = gated_conv1d(x, gate, weight, initial_state=state, return_state=True)
    conv, conv_state = causal_conv1d(x, weight, initial_state=state, return_state=True)
    assert torch.equal(y, torch.nn.functional.silu(conv) * gate) and torch.equal(new_state, conv_state)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: dict(gate=a["gate"][:, :3]), ValueError, r"gate must have x's shape \(2, 4, 5\), got \(2, 3, 5\)"),
    (lambda a: dict(gate=a["gate"].double()), TypeError, "gate must have x's dtype torch.float32"),
    (lambda a: dict(gate=a["gate"][0]), ValueError, "gate must have 3 dimensions"),
    (lambda a: dict(gate="g"), TypeError, "gate must be a torch.Tensor"),
    (lambda a: dict(weight=a["weight"][:2]), ValueError, "channels of x and weight"),
    (lambda a: dict(initial_state=torch.zeros(2, 5, 2)), ValueError, r"initial_state must have shape \(2, 5, 3\)"),
    (lambda a: dict(return_state=1), TypeError, "return_state must be a bool"),
    (lambda a: dict(backend="cuda"), ValueError, "gated_conv1d has no 'cuda' backend"),
])
def test_bad_gated_conv_inputs_raise(change, error, words):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 4, 5, generator=gen), gate=torch.randn(2, 4, 5, generator=gen),
                weight=torch.randn(5, 3, generator=gen))
    args.update(change(args))
    with pytest.raises(error, match=words):
        gated_conv1d(**args)


@pytest.mark.gpu
@nan_filled
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_gpu_conv_kernels_match_direct_formula(T, dtype, with_state, gated):
    check_conv_kernels(2, T, 300, 3, dtype, True, with_state, "cuda", gated=gated)
