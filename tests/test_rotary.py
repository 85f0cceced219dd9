"""The rotary-embedding op: its Triton kernel (interpreter on CPU, compiled on a GPU) against RoPE as a
complex rotation in float64, and its argument checks."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from based.ops.rotary import apply_rotary
from tests.helpers import assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.usefixtures("nan_filled_allocations")


def complex_rotation(x, positions, base=10000.0):
    """RoPE as a complex rotation in float64 (channel i pairs with channel i + D/2) by the op's angles,
    which are float32 by definition (as flash-attn's): at position 1e5 they differ from exact ones by
    ~1e-2 rad, so exact angles would test the angle format, not the kernel."""
    half = x.shape[-1] // 2
    x = x.double()
    z = torch.complex(x[..., :half], x[..., half:])
    theta = base ** -(torch.arange(0, 2 * half, 2, dtype=torch.float32, device=x.device) / (2 * half))
    angle = (positions.float()[:, None] * theta).double()
    z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def check(B, T, H, D, start, dtype, packed, device):
    """Output and gradient (through a random output gradient) against the complex rotation in float64."""
    if packed:  # q and k as the layers rotate them: a strided [B, T, 2H, D] view of a [B, T, 3, H, D] projection
        x = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)[:, :, :2].flatten(2, 3)
    else:
        x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    x.requires_grad_()
    positions = start + torch.arange(T, device=device)
    out = apply_rotary(x, positions, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, complex_rotation(x.detach(), positions), dtype)
    grad_out = torch.randn(out.shape, device=device)
    (dx,) = torch.autograd.grad((out.double() * grad_out).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad((complex_rotation(x64, positions) * grad_out).sum(), x64)
    assert dx.dtype == dtype
    assert_close(dx, want, dtype, "dx")


@pytest.mark.skipif(not INTERPRETED, reason="set TRITON_INTERPRET=1 to run the kernel on CPU")
@settings(max_examples=10)
@given(T=st.sampled_from([1, 5]), H=st.sampled_from([1, 3, 4]), D=st.sampled_from([2, 16, 112]),
       start=st.sampled_from([0, 37, 5000]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       packed=st.booleans())
def test_interpreted_kernel_matches_complex_rotation(T, H, D, start, dtype, packed):
    check(2, T, H, D, start, dtype, packed, "cpu")


def test_bad_inputs_raise():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="one entry per token"):
        apply_rotary(x, torch.arange(3))
    with pytest.raises(TypeError, match="positions has dtype float32"):
        apply_rotary(x, torch.arange(4.0))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        apply_rotary(x[0], torch.arange(4))
    with pytest.raises(ValueError, match="even head dim"):
        apply_rotary(torch.randn(1, 4, 2, 7), torch.arange(4))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 112, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 100000])
def test_gpu_kernel_matches_complex_rotation(D, dtype, start):
    check(3, 300, 16, D, start, dtype, packed=True, device="cuda")
