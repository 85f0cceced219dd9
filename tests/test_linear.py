"""The fused linear op (norm, gate, bias, residual add) against the float64 formula; the Triton matrix-vector
kernel in the interpreter on CPU and compiled on a GPU."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import linear, stacked_linear
from based.ops._backend import chain_options
from tests.helpers import assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


def formula(x, weight, bias, residual, gated, norm_weight=None, eps=1e-5):
    x = x.double()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    y = x @ weight.double().T + (0 if bias is None else bias.double())
    if gated:
        value, gate = y.chunk(2, dim=-1)
        y = value * gate * torch.sigmoid(gate)
    return y if residual is None else residual.double() + y


def check(leading, K, N, dtype, gated, with_bias, with_residual, backend, device, with_norm=False):
    """With a norm, x is the blocks' fp32 residual stream (scaled up, as a stream grows) and the weights bf16/fp32."""
    rows = 2 * N if gated else N
    x_dtype = torch.float32 if with_norm and dtype != torch.float64 else dtype
    x = torch.randn(*leading, K, device=device, dtype=x_dtype) * (8 if with_norm else 1)
    weight = (torch.randn(rows, K, device=device) / K**0.5).to(dtype)
    norm = dict(norm_weight=(1 + torch.rand(K, device=device)).to(dtype), norm_eps=1e-5) if with_norm else {}
    bias = None
    if with_bias:  # of the product's sign, for the reason given for the residual below
        product_sign = formula(x, weight, None, None, False, norm.get("norm_weight")).sign().reshape(-1, rows)[0]
        bias = (torch.randn(rows, device=device).abs() * product_sign.float()).to(dtype)
    residual = None
    if with_residual:
        # Of the product's sign, so the sum cannot cancel: with one output element, a residual that nearly
        # cancels it would turn the reference's bf16 rounding of the product into any relative error at all.
        product_sign = formula(x, weight, bias, None, gated, norm.get("norm_weight")).sign().float()
        residual = torch.randn(*leading, N, device=device).abs() * product_sign
    out = linear(x, weight, bias, residual=residual, gated=gated, backend=backend, **norm)
    assert out.shape == (*leading, N)
    assert out.dtype == (dtype if residual is None else torch.promote_types(dtype, torch.float32))
    assert_close(out, formula(x, weight, bias, residual, gated, norm.get("norm_weight")), dtype)


def check_stacked(leading, K, rows, dtype, with_norm, backend, device):
    """stacked_linear against the formula per weight (a layer's q, k, v: no bias)."""
    x = torch.randn(*leading, K, device=device, dtype=torch.float32 if with_norm else dtype)
    weights = [(torch.randn(n, K, device=device) / K**0.5).to(dtype) for n in rows]
    norm = dict(norm_weight=(1 + torch.rand(K, device=device)).to(dtype)) if with_norm else {}
    outs = stacked_linear(x, weights, backend=backend, **norm)
    assert len(outs) == len(rows)
    for out, weight in zip(outs, weights):
        assert out.shape == (*leading, weight.shape[0]) and out.dtype == dtype
        assert_close(out, formula(x, weight, None, None, False, norm.get("norm_weight")), dtype)


# One row (a batch-1 decode step) in every leading shape the layers pass, odd K and N.
SHAPES = st.tuples(st.sampled_from([(1,), (1, 1), ()]), st.sampled_from([1, 16, 63, 130]),
                   st.sampled_from([1, 24, 64, 130]))


@settings(max_examples=20)
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), gated=st.booleans(),
       with_bias=st.booleans(), with_residual=st.booleans(), with_norm=st.booleans())
def test_reference_matches_formula(shape, dtype, gated, with_bias, with_residual, with_norm):
    check(*shape, dtype, gated, with_bias, with_residual, "torch", "cpu", with_norm)


@settings(max_examples=8)
@given(leading=st.sampled_from([(3,), (2, 5)]), gated=st.booleans(), with_residual=st.booleans(),
       with_norm=st.booleans())
def test_reference_takes_many_rows(leading, gated, with_residual, with_norm):
    check(leading, 16, 24, torch.float32, gated, True, with_residual, "torch", "cpu", with_norm)


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=30)
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.bfloat16]), gated=st.booleans(),
       with_bias=st.booleans(), with_residual=st.booleans(), with_norm=st.booleans())
def test_interpreted_kernel_matches_formula(shape, dtype, gated, with_bias, with_residual, with_norm):
    check(*shape, dtype, gated, with_bias, with_residual, "triton", "cpu", with_norm)


@settings(max_examples=10)
@given(leading=st.sampled_from([(1,), (1, 1), (3, 2)]), rows=st.sampled_from([(24,), (16, 16, 64), (5, 130)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), with_norm=st.booleans())
def test_reference_stacked_matches_formula(leading, rows, dtype, with_norm):
    check_stacked(leading, 40, rows, dtype, with_norm, "torch", "cpu")


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=12)
@given(leading=st.sampled_from([(1,), (1, 1)]), K=st.sampled_from([16, 63]),
       rows=st.sampled_from([(24,), (16, 16, 64), (5, 130), (1, 3, 7)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_norm=st.booleans())
def test_interpreted_kernel_stacked_matches_formula(leading, K, rows, dtype, with_norm):
    check_stacked(leading, K, rows, dtype, with_norm, "triton", "cpu")


@pytest.mark.parametrize("weights, error, words", [
    ([], TypeError, "one to three matrices"),
    ([torch.randn(4, 8)] * 4, TypeError, "one to three matrices"),
    (torch.randn(4, 8), TypeError, "one to three matrices"),
    ([torch.randn(4, 8), torch.randn(4, 7)], ValueError, "must equal weight's in_features"),
    ([torch.randn(4, 8), torch.randn(4, 8).double()], TypeError, "must share a dtype"),
    ([torch.randn(4, 8), torch.randn(4, 8, device="meta")], ValueError, "on meta"),
])
def test_stacked_bad_inputs_raise(weights, error, words):
    with pytest.raises(error, match=words):
        stacked_linear(torch.randn(1, 8), weights)


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
def test_interpreted_kernel_takes_a_strided_weight_and_rejects_many_rows():
    weight = torch.randn(40, 24)[::2]  # rows two apart
    x = torch.randn(1, 24)
    assert_close(linear(x, weight, backend="triton"), formula(x, weight, None, None, False), torch.float32)
    with pytest.raises(ValueError, match="takes one row"):
        linear(torch.randn(2, 24), weight, backend="triton")


@pytest.mark.parametrize("make, error, words", [
    (lambda x, w, b, r: dict(x="x", weight=w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b, r: dict(x=x[0, 0], weight=w), ValueError, "x must have at least one dimension"),
    (lambda x, w, b, r: dict(x=x, weight=w[0]), ValueError, "weight must have 2 dimensions"),
    (lambda x, w, b, r: dict(x=x[:, :3], weight=w), ValueError, "must equal weight's in_features"),
    (lambda x, w, b, r: dict(x=x, weight=w[:5], gated=True), ValueError, "even row count"),
    (lambda x, w, b, r: dict(x=x, weight=w, gated=1), TypeError, "gated must be a bool"),
    (lambda x, w, b, r: dict(x=x.double(), weight=w), TypeError, "must share a dtype"),
    (lambda x, w, b, r: dict(x=x, weight=w, bias=b[:3]), ValueError, "bias must have shape"),
    (lambda x, w, b, r: dict(x=x, weight=w, bias=b.double()), TypeError, "bias must have weight's dtype"),
    (lambda x, w, b, r: dict(x=x, weight=w, residual=r[:, :2]), ValueError, "residual must have shape"),
    (lambda x, w, b, r: dict(x=x, weight=w, residual=r.to("meta")), ValueError, "residual on meta"),
    (lambda x, w, b, r: dict(x=x.int(), weight=w.int()), TypeError, "x has dtype int32"),
    (lambda x, w, b, r: dict(x=x, weight=w, norm_weight=w[0, :5]), ValueError, "norm_weight must have shape"),
    (lambda x, w, b, r: dict(x=x, weight=w, norm_weight=x[0].double()), TypeError, "norm_weight must have weight"),
    (lambda x, w, b, r: dict(x=x, weight=w, norm_weight=x[0], norm_eps=-1.0), ValueError, "norm_eps must be"),
    (lambda x, w, b, r: dict(x=x, weight=w, norm_weight=x[0], norm_eps="1e-5"), ValueError, "norm_eps must be"),
    (lambda x, w, b, r: dict(x=x, weight=w, norm_weight=x[0].to("meta")), ValueError, "norm_weight on meta"),
])
def test_bad_inputs_raise(make, error, words):
    x, w, b, r = torch.randn(1, 8), torch.randn(6, 8), torch.randn(6), torch.randn(1, 6)
    with pytest.raises(error, match=words):
        linear(**make(x, w, b, r))


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", [(1, 1), (63, 130), (1792, 7168), (3584, 1792), (1792, 256), (2048, 50264),
                                  (5000, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated, with_bias, with_residual", [(False, False, False), (False, True, True),
                                                             (True, False, False), (True, True, True)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_gpu_kernel_matches_formula(K, N, dtype, gated, with_bias, with_residual, with_norm):
    check((1, 1), K, N, dtype, gated, with_bias, with_residual, "triton", "cuda", with_norm)


@pytest.mark.gpu
@pytest.mark.parametrize("K, rows", [(1792, (256, 256, 1792)), (63, (16, 16, 64)), (5000, (3, 300))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [False, True])
def test_gpu_kernel_stacked_matches_formula(K, rows, dtype, with_norm):
    check_stacked((1, 1), K, rows, dtype, with_norm, "triton", "cuda")


@pytest.mark.gpu
def test_gpu_kernel_replays_from_a_cuda_graph():
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16)
    linear(x, weight, gated=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, weight, gated=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_close(out, formula(x, weight, None, None, True), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_kernels_are_chained_while_capturing_on_hopper():
    device = torch.device("cuda")
    assert chain_options(device) == {"PDL": False}
    during_capture = {}
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        during_capture.update(chain_options(device))
    assert during_capture["PDL"] == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.gpu
def test_gpu_chained_kernels_read_what_the_previous_kernel_wrote():
    """Dependent GEMVs in one graph (chained on Hopper: each starts before the previous one ends), one of them
    on a transposed weight, whose contiguous copy is written just before it."""
    dtype = torch.bfloat16
    x = torch.randn(1, 1, 320, device="cuda", dtype=dtype)
    w1 = torch.randn(2 * 4608, 320, device="cuda", dtype=dtype) / 320**0.5
    w2 = torch.randn(4608, 700, device="cuda", dtype=dtype).T / 4608**0.5  # [700, 4608], unit stride along rows
    w3 = torch.randn(320, 700, device="cuda", dtype=dtype) / 700**0.5
    residual = torch.randn(1, 1, 320, device="cuda")

    def chain():
        h1 = linear(x, w1, gated=True)
        h2 = linear(h1, w2)
        return h1, h2, linear(h2, w3, residual=residual)

    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h1, h2, out = chain()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        assert_close(h1, formula(x, w1, None, None, True), dtype)
        assert_close(h2, formula(h1, w2, None, None, False), dtype)
        assert_close(out, formula(h2, w3, None, residual, False), dtype)


@pytest.mark.parametrize("with_norm, with_residual", [(False, False), (True, True)])
def test_autocast_casts_as_f_linear_does(with_norm, with_residual):
    """Under torch.autocast the fp32 weights (and x, without a norm) enter the product in the autocast dtype, so
    modules built on `linear` run there as `nn.Linear` does; with a residual the result keeps its fp32."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 5, 16, generator=gen), torch.randn(24, 16, generator=gen)
    bias = torch.randn(24, generator=gen)
    norm = dict(norm_weight=1 + torch.rand(16, generator=gen)) if with_norm else {}
    residual = torch.randn(3, 5, 24, generator=gen) if with_residual else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, weight, bias, residual=residual, **norm)
        first, = stacked_linear(x, [weight], **norm)
    normed = linear(x, torch.eye(16), **norm) if with_norm else x  # the fp32 norm alone (or x)
    ref = F.linear(normed.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert out.dtype == (torch.float32 if with_residual else torch.bfloat16)
    assert_close(out, ref.double() + (0 if residual is None else residual.double()), torch.bfloat16)
    assert first.dtype == torch.bfloat16
    assert_close(first, ref - bias.bfloat16(), torch.bfloat16)
