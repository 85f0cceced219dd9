"""`taylor_feature_map`: the second-order Taylor feature map of Based linear attention."""
from __future__ import annotations

import torch

from based.ops._backend import grad_needed, resolve_backend
from based.ops._validate import KERNEL_DTYPES, check_tensor
from based.ops.feature_map.reference import feature_dim_of, taylor_feature_map_torch

__all__ = ["taylor_feature_map", "feature_dim_of"]


def taylor_feature_map(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Taylor features of `x`.

    Args:
        x: `[..., d]`, fp16/bf16/fp32 (fp64 on the torch backend), at least one dimension.
        backend: "auto" (the `based._C` kernel on CUDA for fp16/bf16/fp32 inputs with d <= 64 when no gradient
            is needed, else the reference), "torch" or "cuda" (forward only: its output carries no gradient).

    Returns:
        `[..., E]` with `E = 1 + d + d*(d+1)/2`, same dtype as `x`, such that
        `<phi(q), phi(k)> = 1 + s + s*s/2` with `s = q.k / sqrt(d)`.
        Kernels never materialise this tensor; it is here for users and tests.
    """
    check_tensor("x", x, ndim=None)
    if backend == "auto" and not _kernel_supports(x):
        backend = "torch"
    impl = resolve_backend("taylor_feature_map", backend, x.device, _implementations())
    return impl(x)


def _kernel_supports(x: torch.Tensor) -> bool:
    from based.ops.feature_map.cuda import MAX_FEATURE_DIM  # noqa: PLC0415

    return not grad_needed(x) and x.dtype in KERNEL_DTYPES and x.shape[-1] <= MAX_FEATURE_DIM


def _implementations():
    impls = {"torch": taylor_feature_map_torch}
    from based.ops.feature_map import cuda as _cuda  # noqa: PLC0415 — optional extension, loaded lazily

    impls["cuda"] = _cuda.taylor_feature_map_cuda
    return impls
