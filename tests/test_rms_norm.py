"""RMSNorm (optionally fused with the residual add) against the float64 formula; the Triton kernel in the
interpreter on CPU and compiled on a GPU."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops import rms_norm
from tests.helpers import assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


def formula(x, weight, eps, residual=None):
    """(y, s) in float64: s = residual + x, y = s / sqrt(mean(s^2) + eps) * weight."""
    s = x.double() if residual is None else residual.double() + x.double()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), s


def check(shape, x_dtype, w_dtype, with_residual, backend, device):
    x = torch.randn(shape, device=device, dtype=x_dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(w_dtype)
    residual = torch.randn(shape, device=device) if with_residual else None
    out = rms_norm(x, weight, 1e-5, residual=residual, backend=backend)
    y_ref, s_ref = formula(x, weight, 1e-5, residual)
    y = out[0] if with_residual else out
    assert y.dtype == w_dtype and y.shape == x.shape
    tolerance_dtype = torch.float32 if {x_dtype, w_dtype} == {torch.float32} else torch.bfloat16
    assert_close(y, y_ref, tolerance_dtype)
    if with_residual:
        assert out[1].dtype == torch.promote_types(x_dtype, torch.float32)
        assert_close(out[1], s_ref, torch.float32, "residual + x")


@settings(max_examples=15)
@given(shape=st.sampled_from([(1, 1), (3, 7), (2, 5, 64), (4, 1792)]),
       x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       w_dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_residual=st.booleans())
def test_reference_matches_formula(shape, x_dtype, w_dtype, with_residual):
    check(shape, x_dtype, w_dtype, with_residual, "torch", "cpu")


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=12)
@given(shape=st.sampled_from([(1, 1), (3, 7), (2, 5, 64), (4, 1792)]),
       x_dtype=st.sampled_from([torch.float32, torch.bfloat16]), w_dtype=st.sampled_from([torch.float32,
                                                                                           torch.bfloat16]),
       with_residual=st.booleans())
def test_interpreted_kernel_matches_formula(shape, x_dtype, w_dtype, with_residual):
    check(shape, x_dtype, w_dtype, with_residual, "triton", "cpu")


@pytest.mark.parametrize("make, error, words", [
    (lambda x, w, r: ("x", w, r), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, r: (x[0, 0], w, r), ValueError, "x must have at least one dimension"),
    (lambda x, w, r: (x, w[:3], r), ValueError, "weight must have shape"),
    (lambda x, w, r: (x, w[None], r), ValueError, "weight must have 1 dimensions"),
    (lambda x, w, r: (x, w, r[:1]), ValueError, "residual must have shape"),
    (lambda x, w, r: (x.int(), w, r), TypeError, "x has dtype int32"),
    (lambda x, w, r: (x, w, r.to("meta")), ValueError, "residual on meta"),
])
def test_bad_inputs_raise(make, error, words):
    x, w, r = torch.randn(2, 8), torch.ones(8), torch.randn(2, 8)
    x, w, r = make(x, w, r)
    with pytest.raises(error, match=words):
        rms_norm(x, w, residual=r)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(torch.randn(2, 8), torch.ones(8), -1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64), (4, 1792), (4096, 2048)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_kernel_matches_formula(shape, x_dtype, with_residual):
    check(shape, x_dtype, torch.bfloat16 if x_dtype != torch.float32 else torch.float32, with_residual, "triton",
          "cuda")


def check_gradients(shape, x_dtype, w_dtype, with_residual, device, use_y=True, use_s=True):
    """Gradients of the Triton op (through y and, with a residual, through the sum it returns) against the float64
    formula's."""
    gen = torch.Generator(device).manual_seed(0)  # the same draw on every call hypothesis makes

    def randn(*size):
        return torch.randn(*size, device=device, generator=gen)

    x = randn(*shape).to(x_dtype).requires_grad_()
    weight = (1 + 0.1 * randn(shape[-1])).to(w_dtype).requires_grad_()
    residual = randn(*shape).requires_grad_() if with_residual else None
    leaves = [t for t in (x, weight, residual) if t is not None]
    gy, gs = randn(*shape), randn(*shape)
    out = rms_norm(x, weight, 1e-5, residual=residual, backend="triton")
    y, s = out if with_residual else (out, None)
    loss = (y.double() * gy).sum() * use_y + ((s.double() * gs).sum() * use_s if s is not None else 0)
    got = torch.autograd.grad(loss, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64, s64 = formula(leaves64[0], leaves64[1], 1e-5, leaves64[2] if with_residual else None)
    ref = (y64 * gy).sum() * use_y + ((s64 * gs).sum() * use_s if with_residual else 0)
    want = torch.autograd.grad(ref, leaves64)
    tolerance_dtype = torch.float32 if {x_dtype, w_dtype} == {torch.float32} else torch.bfloat16
    for name, g, w in zip(("dx", "dweight", "dresidual"), got, want):
        assert_close(g, w, tolerance_dtype, name)
    assert got[0].dtype == x_dtype and got[1].dtype == w_dtype


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=12)
@given(shape=st.sampled_from([(1, 3), (3, 7), (2, 5, 64), (9, 130)]),  # d x is O(eps) for one feature: no test
       x_dtype=st.sampled_from([torch.float32, torch.bfloat16]), w_dtype=st.sampled_from([torch.float32,
                                                                                           torch.bfloat16]),
       with_residual=st.booleans())
def test_interpreted_kernel_gradients_match_formula(shape, x_dtype, w_dtype, with_residual):
    check_gradients(shape, x_dtype, w_dtype, with_residual, "cpu")


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@pytest.mark.parametrize("use_y, use_s", [(True, False), (False, True)])
def test_interpreted_kernel_gradients_through_one_output(use_y, use_s):
    check_gradients((5, 24), torch.float32, torch.float32, True, "cpu", use_y=use_y, use_s=use_s)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3), (3, 7), (2, 1000, 1024), (4096, 2048)])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_kernel_gradients_match_formula(shape, x_dtype, w_dtype, with_residual):
    check_gradients(shape, x_dtype, w_dtype, with_residual, "cuda")
