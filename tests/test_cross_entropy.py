"""`based.ops.linear_cross_entropy` (chunked, gradients in the forward pass) against the full-logits reference."""
import pytest
import torch
import torch.nn.functional as F

from based.ops import linear_cross_entropy
from tests.helpers import TOLERANCE, assert_close


def inputs(gen, N=37, d=8, V=11, dtype=torch.float64, ignored=(3, 10)):
    x = torch.randn(N, d, generator=gen, dtype=dtype)
    w = torch.randn(V, d, generator=gen, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[list(ignored)] = -100
    return x, w, y


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_loss_and_gradients(chunk_size, dtype):
    x, w, y = inputs(torch.Generator().manual_seed(0), dtype=dtype)
    x.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(x, w, y, chunk_size=chunk_size)
    grad_out = torch.tensor(1.7, dtype=loss.dtype)
    loss.backward(grad_out)
    dx, dw = x.grad, w.grad
    x.grad = w.grad = None
    ref = F.cross_entropy((x.double() @ w.double().T), y)  # float64 throughout
    ref.backward(grad_out.double())
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.shape == ()
    assert abs(loss.item() - ref.item()) < TOLERANCE[dtype] * abs(ref.item())
    assert_close(dx, x.grad, dtype, "dx")
    assert_close(dw, w.grad, dtype, "dw")
    assert dx.dtype == dtype and dw.dtype == dtype


def test_no_gradient_work_without_gradients():
    x, w, y = inputs(torch.Generator().manual_seed(1), dtype=torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y, chunk_size=4)
    assert not loss.requires_grad
    assert abs(loss.item() - F.cross_entropy(x @ w.T, y).item()) < 1e-5


def test_only_x_or_only_weight_differentiated():
    x, w, y = inputs(torch.Generator().manual_seed(2), dtype=torch.float32)
    x.requires_grad_()
    linear_cross_entropy(x, w, y, chunk_size=6).backward()
    assert x.grad is not None and w.grad is None


def test_bf16_inputs_within_bf16_tolerance():
    x, w, y = inputs(torch.Generator().manual_seed(3), N=200, d=32, V=300, dtype=torch.float32)
    xb, wb = (t.bfloat16().requires_grad_() for t in (x, w))
    linear_cross_entropy(xb, wb, y, chunk_size=64).backward()
    xr, wr = (t.bfloat16().double().requires_grad_() for t in (x, w))
    F.cross_entropy(xr @ wr.T, y).backward()
    assert_close(xb.grad, xr.grad, torch.bfloat16, "dx")
    assert_close(wb.grad, wr.grad, torch.bfloat16, "dw")
    assert TOLERANCE[torch.bfloat16] == 1e-2


def test_rejects_bad_arguments():
    x, w, y = inputs(torch.Generator().manual_seed(4), dtype=torch.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_cross_entropy(x, w, torch.full_like(y, 11))
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_cross_entropy(x, w, torch.full_like(y, -1))
    with pytest.raises(TypeError, match="labels has dtype int32"):
        linear_cross_entropy(x, w, y.int())
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(x, w, y[:-1])
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(x, w[:, :-1], y)
    with pytest.raises(TypeError, match="weight has dtype"):
        linear_cross_entropy(x, w.double(), y)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(x, w, y, backend="triton")
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(x, w, y, ignore_index=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference_loss_and_gradients(dtype):
    """A language-model-sized slice on the GPU: 3000 tokens, vocabulary 5000, several chunks."""
    x, w, y = inputs(torch.Generator().manual_seed(2), N=3000, d=64, V=5000, dtype=torch.float64, ignored=(0, 17))
    x, w = (t.mul(0.25).to("cuda", dtype).requires_grad_() for t in (x, w))
    y = y.cuda()
    loss = linear_cross_entropy(x, w, y, chunk_size=1024)
    loss.backward()
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    ref = F.cross_entropy(xd @ wd.T, y)
    ref.backward()
    assert abs(loss.item() - ref.item()) < TOLERANCE[dtype] * abs(ref.item())
    assert_close(x.grad, xd.grad, dtype, "dx")
    assert_close(w.grad, wd.grad, dtype, "dw")


def test_autocast_takes_the_head_product_in_its_dtype():
    """Under torch.autocast the fp32 x and weight are cast to its dtype first, as the model's `nn.Linear` head is."""
    x, w, y = inputs(torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, y)
    ref = F.cross_entropy((x.bfloat16() @ w.bfloat16().T).float(), y)
    assert loss.dtype == torch.float32
    assert_close(loss, ref.double(), torch.bfloat16)
