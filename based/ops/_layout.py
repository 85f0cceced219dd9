"""The memory layouts kernels need, in one place.

Kernels take the strides of their tensor arguments as arguments, except along dimensions they address as
contiguous (a row of features, a vector of weights). Every kernel wrapper hands such arguments over through
`unit_stride`, which copies only what is not laid out that way already. An argument the op updates in place
cannot be copied behind the caller's back, so `require_unit_stride` refuses it by name instead.
"""
from __future__ import annotations

import torch


def has_unit_stride(x: torch.Tensor, dims: int = 1) -> bool:
    """Whether the last `dims` dimensions of x are laid out densely, row-major (size-1 dims may have any stride)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[-dims:]), reversed(x.stride()[-dims:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def unit_stride(x: torch.Tensor | None, dims: int = 1) -> torch.Tensor | None:
    """x itself when its last `dims` dimensions are dense and row-major, else a contiguous copy; None stays None."""
    if x is None or has_unit_stride(x, dims):
        return x
    return x.contiguous()


def require_unit_stride(name: str, x: torch.Tensor, kernel: str, dims: int = 1) -> None:
    """ValueError naming `name` unless its last `dims` dimensions are dense and row-major: for arguments
    `kernel` updates in place, which a copy would leave untouched."""
    if not has_unit_stride(x, dims):
        what = "its last dimension" if dims == 1 else f"its last {dims} dimensions"
        raise ValueError(f"{name} is updated in place by {kernel}, which needs {what} dense (unit stride), "
                         f"got shape {tuple(x.shape)} with strides {x.stride()}; pass a contiguous tensor or use "
                         "backend='torch'")
