"""The Taylor feature map (PyTorch path on CPU) and the based._C CUDA kernel behind backend="cuda" (GPU tests)."""
import math

import pytest
import torch

import based
from hypothesis import given
from hypothesis import strategies as st

from based.ops import feature_dim_of, taylor_feature_map
from based.ops.feature_map import cuda as feature_map_cuda
from tests.helpers import assert_close


def phi_formula(x: torch.Tensor) -> torch.Tensor:
    """The documented layout written out term by term, in float64: 1, x_i/d^(1/4), then for i <= j
    (row-major upper triangle) x_i*x_j/sqrt(d), divided by sqrt(2) more on the diagonal."""
    x = x.double()
    d = x.shape[-1]
    terms = [torch.ones_like(x[..., 0])] + [x[..., i] / d**0.25 for i in range(d)]
    for i in range(d):
        for j in range(i, d):
            terms.append(x[..., i] * x[..., j] / math.sqrt(d) / (math.sqrt(2) if i == j else 1))
    return torch.stack(terms, dim=-1)


leading_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3)


# ---------------------------------------------------------------------------------------------- CPU


def test_feature_count():
    assert feature_dim_of(16) == 153
    assert taylor_feature_map(torch.randn(2, 16)).shape == (2, 153)


@given(lead=leading_shapes, d=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_inner_product_is_taylor_series(lead, d, seed):
    """<phi(q), phi(k)> = 1 + s + s^2/2 with s = q.k/sqrt(d), for every pair of rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    s = (q * k).sum(-1) / math.sqrt(d)
    dots = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    assert_close(dots, 1 + s + s * s / 2, torch.float64, "inner product")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16,), (3, 5, 16), (2, 7, 3, 5), (1, 1)])
def test_layout_matches_formula(shape, dtype):
    x = torch.randn(shape).to(dtype)
    out = taylor_feature_map(x)
    assert out.dtype == dtype
    assert_close(out, phi_formula(x), dtype, "phi")


def test_non_contiguous_input():
    x = torch.randn(6, 16, 5).transpose(1, 2)[::2]  # [3, 5, 16], strided
    assert not x.is_contiguous()
    assert_close(taylor_feature_map(x), phi_formula(x), torch.float32, "phi of strided x")


def test_auto_on_cpu_uses_torch(monkeypatch):
    def fail(x):
        raise AssertionError("the CUDA kernel must not run on a CPU tensor")

    monkeypatch.setattr(feature_map_cuda, "taylor_feature_map_cuda", fail)
    x = torch.randn(4, 16)
    assert_close(taylor_feature_map(x, backend="auto"), phi_formula(x), torch.float32)


def test_cuda_backend_on_cpu_tensor_raises():
    with pytest.raises(ValueError, match="cuda"):
        taylor_feature_map(torch.randn(4, 16), backend="cuda")


@pytest.mark.parametrize("backend", ["nope", "triton"])
def test_unknown_or_missing_backend_raises(backend):
    with pytest.raises(ValueError, match="backend"):
        taylor_feature_map(torch.randn(4, 16), backend=backend)


@pytest.mark.parametrize("x, error, match", [
    ([1.0, 2.0], TypeError, "x must be a torch.Tensor"),
    (torch.tensor(1.0), ValueError, "shape"),
    (torch.randn(3, 0), ValueError, "shape"),
    (torch.ones(3, 4, dtype=torch.int64), TypeError, "dtype"),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        taylor_feature_map(x)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_extension_imports_and_registers_op():
    # Fails, rather than skips, on a GPU machine without the build.
    try:
        from based import _C  # noqa: F401
    except ImportError as error:
        pytest.fail(f"based._C does not import next to {based.__file__} ({error}); on a GPU machine run "
                    "`pip install --no-build-isolation -e .` (editable, so the tests' import finds it)")
    assert hasattr(torch.ops.based, "taylor_feature_map")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16,), (1, 1), (3, 7, 5, 16), (2, 33, 3, 16), (5, 64), (4097, 5), (9, 33)])
def test_cuda_kernel_matches_formula(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    out = taylor_feature_map(x, backend="cuda")
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, phi_formula(x), dtype, "phi (cuda)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_non_contiguous_and_empty(dtype):
    x = torch.randn(6, 16, 5, device="cuda", dtype=dtype).transpose(1, 2)[::2]
    assert not x.is_contiguous()
    assert_close(taylor_feature_map(x, backend="cuda"), phi_formula(x), dtype, "phi of strided x (cuda)")
    empty = torch.empty(0, 3, 16, device="cuda", dtype=dtype)
    assert taylor_feature_map(empty, backend="cuda").shape == (0, 3, 153)


@pytest.mark.gpu
def test_cuda_kernel_bad_input():
    from based import _C  # noqa: F401

    op = torch.ops.based.taylor_feature_map
    with pytest.raises(TypeError, match="dtype"):
        op(torch.randn(4, 16, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension"):
        op(torch.randn(4, 65, device="cuda"))
    with pytest.raises(ValueError, match="only a CUDA kernel"):
        op(torch.randn(4, 16))


@pytest.mark.gpu
def test_cuda_kernel_under_torch_compile():
    """The Meta kernel lets torch.compile trace the op without a graph break."""
    from based import _C  # noqa: F401

    fn = torch.compile(lambda x: torch.ops.based.taylor_feature_map(x) * 2, fullgraph=True)
    x = torch.randn(3, 5, 16, device="cuda")
    assert_close(fn(x), 2 * phi_formula(x), torch.float32, "compiled phi")


@pytest.mark.gpu
def test_public_cuda_path_rejects_bad_input_before_the_extension():
    with pytest.raises(TypeError, match="dtype"):
        taylor_feature_map(torch.randn(4, 16, device="cuda", dtype=torch.float64), backend="cuda")
    with pytest.raises(ValueError, match="last dimension"):
        taylor_feature_map(torch.randn(4, 65, device="cuda"), backend="cuda")
