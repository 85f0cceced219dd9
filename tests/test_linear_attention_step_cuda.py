"""The fused CUDA decode step (`based._C`, kernels/linear_attention_step.cu) against `linear_attention_step_torch`.

The CPU tests check that the Python wrapper rejects what the kernel cannot run before it imports the extension.
The gpu-marked tests need `based._C` built (they skip without it). Outputs are NaN-prefilled (see conftest.py).
"""
import sys

import pytest
import torch

import based
from based.ops import LinearAttentionState
from based.ops.feature_map.reference import taylor_feature_map_torch
from based.ops.linear_attention.cuda_step import linear_attention_step_cuda
from based.ops.linear_attention.reference import linear_attention_step_torch
from tests.helpers import TOLERANCE, assert_close

pytestmark = pytest.mark.usefixtures("nan_filled_allocations")
EPS = 1e-6


def random_inputs(B, H, d, dv, dtype=torch.float32, device="cpu"):
    # q, k scaled so that s = q.k/sqrt(d) is O(1), the regime trained models run in.
    q, k = (torch.randn(B, H, d, device=device) * 0.5 for _ in range(2))
    v = torch.randn(B, H, dv, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_state(B, H, d, dv, device):
    """The state after 64 random earlier tokens, so the denominators are what a real prefix gives."""
    k, v = torch.randn(B, 64, H, d, device=device) * 0.5, torch.randn(B, 64, H, dv, device=device)
    phi = taylor_feature_map_torch(k)
    return LinearAttentionState(torch.einsum("bthe,bthc->bhec", phi, v).contiguous(), phi.sum(1).contiguous())


# ---------------------------------------------------------------------------------------------- CPU


@pytest.fixture
def extension_unimportable(monkeypatch):
    """`from based import _C` raises ImportError, so a check that let bad input through fails the test."""
    monkeypatch.delattr(based, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "based._C", None)


def state_for(q, v, dtype=torch.float32):
    B, H, d = q.shape
    return LinearAttentionState.zeros(B, H, d, v.shape[-1], dtype=dtype)


def transposed_kv(state):
    """The same state with kv stored value-major: right shape, not contiguous."""
    kv = state.kv.transpose(-1, -2).contiguous().transpose(-1, -2)
    return LinearAttentionState(kv, state.ksum)


def strided_ksum(state):
    return LinearAttentionState(state.kv, torch.zeros(*state.ksum.shape, 2)[..., 0])


@pytest.mark.parametrize("make, error, match", [
    (lambda: random_inputs(2, 3, 16, 64, torch.float64), TypeError, "dtypes"),
    (lambda: random_inputs(2, 3, 16, 64)[:2] + (torch.randn(2, 3, 64, dtype=torch.bfloat16),), TypeError, "dtypes"),
    (lambda: random_inputs(2, 3, 33, 64), ValueError, r"last dimension of q must be in \[1, 32\]"),
    (lambda: random_inputs(2, 3, 16, 257), ValueError, r"last dimension of v must be in \[1, 256\]"),
], ids=["float64", "mixed dtypes", "d=33", "dv=257"])
def test_wrapper_rejects_inputs_the_kernel_cannot_run(make, error, match, extension_unimportable):
    q, k, v = make()
    with pytest.raises(error, match=match):
        linear_attention_step_cuda(q, k, v, state_for(q, v), True, EPS)


@pytest.mark.parametrize("change, error, match", [
    (lambda state: LinearAttentionState(state.kv.double(), state.ksum), TypeError, "state.kv has dtype"),
    (lambda state: LinearAttentionState(state.kv, state.ksum.double()), TypeError, "state.ksum has dtype"),
    (transposed_kv, ValueError, "state.kv must be contiguous"),
    (strided_ksum, ValueError, "state.ksum must be contiguous"),
], ids=["kv float64", "ksum float64", "kv value-major", "ksum strided"])
def test_wrapper_rejects_states_the_kernel_cannot_update(change, error, match, extension_unimportable):
    q, k, v = random_inputs(2, 3, 16, 64)
    with pytest.raises(error, match=match):
        linear_attention_step_cuda(q, k, v, change(state_for(q, v)), True, EPS)


@pytest.mark.parametrize("d, dv", [(16, 64), (1, 1), (32, 256)])
def test_wrapper_rejects_cpu_tensors_after_the_other_checks(d, dv, extension_unimportable):
    q, k, v = random_inputs(2, 3, d, dv, torch.bfloat16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_attention_step_cuda(q, k, v, state_for(q, v), True, EPS)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def extension():
    try:
        from based import _C  # noqa: F401
    except ImportError as error:
        pytest.skip(f"based._C is not built ({error}); `pip install --no-build-isolation -e .` on a GPU machine")


def assert_output_close(out, ref, what):
    """`out` against the fp32 reference `ref`. fp32: relative error < 1e-4. fp16/bf16: every element within one
    rounding of `ref` (half an ulp, plus the fp32 tolerance), i.e. the fp32 result rounded once. A norm-wise 1e-4
    against the reference's own rounding would fail now and then: wherever the kernel's other fp32 summation order
    moves a value across a rounding boundary, that element is off by a whole ulp (~4e-3 relative in bf16)."""
    if out.dtype == torch.float32:
        assert_close(out, ref, torch.float32, what)
        return
    unit_roundoff = torch.finfo(out.dtype).eps / 2
    torch.testing.assert_close(out.float(), ref, rtol=unit_roundoff + TOLERANCE[torch.float32],
                               atol=1e-5 * ref.abs().max().item(), msg=lambda m: f"{what} ({out.dtype}): {m}")


def check_steps(B, H, d, dv, dtype, normalize, steps, initial_state):
    """`steps` consecutive kernel steps vs the reference on fp32 copies: outputs (stacked), kv, ksum."""
    if initial_state == "random":
        state = random_state(B, H, d, dv, "cuda")
    else:
        state = LinearAttentionState.zeros(B, H, d, dv, device="cuda")
    ref_state = LinearAttentionState(state.kv.clone(), state.ksum.clone())
    outs, refs = [], []
    for _ in range(steps):
        q, k, v = random_inputs(B, H, d, dv, dtype, "cuda")
        outs.append(linear_attention_step_cuda(q, k, v, state, normalize, EPS))
        refs.append(linear_attention_step_torch(q.float(), k.float(), v.float(), ref_state, normalize, EPS))
    assert outs[0].dtype == dtype and outs[0].shape == (B, H, dv)
    assert_output_close(torch.stack(outs), torch.stack(refs), "o")
    assert_close(state.kv, ref_state.kv, torch.float32, "kv")
    assert_close(state.ksum, ref_state.ksum, torch.float32, "ksum")


@pytest.mark.gpu
@pytest.mark.parametrize("initial_state", ["zero", "random"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dv", [64, 112, 128])
@pytest.mark.parametrize("d", [16, 8])
@pytest.mark.parametrize("B, H", [(1, 2), (3, 16)])  # one block per (b, h): only their product matters
def test_1000_steps_match_reference(B, H, d, dv, dtype, normalize, initial_state, extension):
    check_steps(B, H, d, dv, dtype, normalize, 1000, initial_state)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, dv", [(1, 1), (3, 7), (2, 255), (5, 200), (16, 129), (32, 33), (32, 256)])
def test_any_d_and_dv_in_range(d, dv, dtype, extension):
    check_steps(2, 3, d, dv, dtype, True, 20, "random")


@pytest.mark.gpu
def test_strided_inputs(extension):
    B, H, d, dv = 2, 3, 16, 112
    qkv = torch.randn(B, H, 2 * d + dv, device="cuda")  # q | k | v packed, as one projection gives them
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    state = random_state(B, H, d, dv, "cuda")
    ref_state = LinearAttentionState(state.kv.clone(), state.ksum.clone())
    out = linear_attention_step_cuda(q, k, v, state, True, EPS)
    assert_close(out, linear_attention_step_torch(q, k, v, ref_state, True, EPS), torch.float32, "o")
    assert_close(state.kv, ref_state.kv, torch.float32, "kv")


@pytest.mark.gpu
def test_step_replays_from_a_cuda_graph(extension):
    B, H, d, dv = 4, 16, 16, 64
    state = random_state(B, H, d, dv, "cuda")
    ref_state = LinearAttentionState(state.kv.clone(), state.ksum.clone())
    q, k, v = random_inputs(B, H, d, dv, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_attention_step_cuda(q, k, v, state, True, EPS)
    # Capturing ran nothing; each replay is one step with whatever q, k, v hold.
    for _ in range(3):
        for static, new in zip((q, k, v), random_inputs(B, H, d, dv, device="cuda")):
            static.copy_(new)
        graph.replay()
        assert_close(out, linear_attention_step_torch(q, k, v, ref_state, True, EPS), torch.float32, "o (replay)")
    assert_close(state.kv, ref_state.kv, torch.float32, "kv")
    assert_close(state.ksum, ref_state.ksum, torch.float32, "ksum")


@pytest.mark.gpu
def test_under_torch_compile(extension):
    """The Meta kernel and the schema's mutation marks let torch.compile trace the op whole."""
    B, H, d, dv = 2, 4, 16, 64

    @torch.compile(fullgraph=True)
    def step(q, k, v, kv, ksum):
        return torch.ops.based.linear_attention_step(q, k, v, kv, ksum, True, EPS) * 2

    state = random_state(B, H, d, dv, "cuda")
    ref_state = LinearAttentionState(state.kv.clone(), state.ksum.clone())
    q, k, v = random_inputs(B, H, d, dv, device="cuda")
    out = step(q, k, v, state.kv, state.ksum)
    assert_close(out, 2 * linear_attention_step_torch(q, k, v, ref_state, True, EPS), torch.float32, "o")
    assert_close(state.kv, ref_state.kv, torch.float32, "kv updated in place")


@pytest.mark.gpu
def test_meta_kernel_gives_the_output_shape(extension):
    q, k = (torch.empty(2, 3, 16, device="meta", dtype=torch.bfloat16) for _ in range(2))
    v = torch.empty(2, 3, 112, device="meta", dtype=torch.bfloat16)
    kv, ksum = torch.empty(2, 3, 153, 112, device="meta"), torch.empty(2, 3, 153, device="meta")
    out = torch.ops.based.linear_attention_step(q, k, v, kv, ksum, True, EPS)
    assert out.shape == (2, 3, 112) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.gpu
def test_cpp_checks_name_the_argument(extension):
    op = torch.ops.based.linear_attention_step
    q, k, v = random_inputs(2, 3, 16, 64, device="cuda")
    state = LinearAttentionState.zeros(2, 3, 16, 64, device="cuda")
    with pytest.raises(TypeError, match="q has dtype"):
        op(q.double(), k.double(), v.double(), state.kv, state.ksum, True, EPS)
    with pytest.raises(ValueError, match="kv must be contiguous"):
        op(q, k, v, transposed_kv(state).kv, state.ksum, True, EPS)
    with pytest.raises(ValueError, match=r"ksum must have shape \[2, 3, 153\]"):
        op(q, k, v, state.kv, state.ksum[..., :-1].contiguous(), True, EPS)
    with pytest.raises(ValueError, match="ksum on cpu"):
        op(q, k, v, state.kv, state.ksum.cpu(), True, EPS)
    with pytest.raises(ValueError, match="only a CUDA kernel"):
        op(q.cpu(), k.cpu(), v.cpu(), state.kv.cpu(), state.ksum.cpu(), True, EPS)
