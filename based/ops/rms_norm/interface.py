"""Public entry point of RMSNorm: argument checks, then backend dispatch."""
from __future__ import annotations

import torch

from based.ops._backend import compiled_training, resolve_backend, triton_available
from based.ops._validate import KERNEL_DTYPES, check_nonnegative, check_same_device, check_shape, check_tensor
from based.ops.rms_norm.reference import rms_norm_torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """`y = s / sqrt(mean(s^2) + eps) * weight` over the last dim, with `s = residual + x` when a residual is
    given (the pre-norm block's add, fused into the same pass), else `s = x`.

    Args:
        x: `[..., D]`; fp16, bf16, fp32 (fp64 on the torch backend).
        weight: `[D]`; its dtype is the output's.
        residual: optional, x's shape, fp32 (the blocks' residual stream; fp64 on the torch backend).
        backend: "auto" (on CUDA the Triton kernels, forward and backward, where the dtypes suit them, except
            for training under torch.compile, where inductor fuses the reference faster; else the reference),
            "torch" or "triton".

    Returns:
        `y` in weight's dtype, computed in fp32 (fp64 for fp64 inputs); with a residual `(y, s)`, s in fp32.
    """
    check_tensor("x", x, ndim=None)
    check_tensor("weight", weight, ndim=1)
    check_shape("weight", weight, (x.shape[-1],))
    if residual is not None:
        check_tensor("residual", residual, ndim=None)
        check_shape("residual", residual, tuple(x.shape))
    check_same_device(x=x, weight=weight, residual=residual)
    check_nonnegative("eps", eps)
    if backend == "auto" and not _kernel_supports(x, weight, residual):
        backend = "torch"
    impl = resolve_backend("rms_norm", backend, x.device, _implementations())
    y, s = impl(x, weight, eps, residual)
    return y if residual is None else (y, s)


def _kernel_supports(x, weight, residual) -> bool:
    return (not compiled_training(x, weight, residual) and x.dtype in KERNEL_DTYPES
            and weight.dtype in KERNEL_DTYPES and (residual is None or residual.dtype == torch.float32)
            and x.shape[-1] <= 65536)


def _implementations():
    impls = {"torch": rms_norm_torch}
    if triton_available():
        from based.ops.rms_norm.triton_kernel import rms_norm_triton  # noqa: PLC0415 (needs triton)

        impls["triton"] = rms_norm_triton
    return impls
