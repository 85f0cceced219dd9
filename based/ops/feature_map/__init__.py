"""`taylor_feature_map`: the second-order Taylor feature map of Based linear attention."""
from __future__ import annotations

import torch

from based.ops._backend import resolve_backend
from based.ops._validate import check_tensor
from based.ops.feature_map.reference import feature_dim_of, taylor_feature_map_torch

__all__ = ["taylor_feature_map", "feature_dim_of"]


def taylor_feature_map(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Taylor features of `x`.

    Args:
        x: `[..., d]`, fp16/bf16/fp32 (fp64 on the torch backend), at least one dimension.
        backend: "auto", "torch" or "cuda" (the `based._C` kernel).

    Returns:
        `[..., E]` with `E = 1 + d + d*(d+1)/2`, same dtype as `x`, such that
        `<phi(q), phi(k)> = 1 + s + s*s/2` with `s = q.k / sqrt(d)`.
        Kernels never materialise this tensor; it is here for users and tests.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_tensor("x", x, ndim=max(x.dim(), 1))
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    impl = resolve_backend("taylor_feature_map", backend, x.device, _implementations())
    return impl(x)


def _implementations():
    impls = {"torch": taylor_feature_map_torch}
    from based.ops.feature_map import cuda as _cuda  # noqa: PLC0415 — optional extension, loaded lazily

    impls["cuda"] = _cuda.taylor_feature_map_cuda
    return impls
