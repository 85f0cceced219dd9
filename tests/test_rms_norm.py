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
