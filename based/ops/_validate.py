"""Input checks shared by every op: each raises ValueError/TypeError naming the argument and what it saw.

One rule for empty inputs across all ops: a tensor argument with an empty dimension (batch, length, heads or
features of size 0) is a ValueError, never an empty result or an error from deep inside a kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch

# float64 is accepted by the PyTorch reference path (tests compare against it); kernels take the other three.
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x, *, ndim: int | None, dtypes: Sequence[torch.dtype] = REFERENCE_DTYPES) -> None:
    """`x` must be a tensor of rank `ndim` (any rank >= 1 when None) with one of `dtypes`, and no empty dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is None and x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar (shape ())")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; supported: {allowed}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not have empty dimensions, got shape {tuple(x.shape)}")


def check_bool(name: str, value) -> None:
    """Flags are real bools: a string or a number is a mistake, not a truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r:.40}")


def check_nonnegative(name: str, value) -> None:
    """A real number >= 0 (an eps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_kernel_dtype(dtype: torch.dtype, kernels: str) -> None:
    """TypeError unless the kernels take `dtype`; `kernels` names them with their verb ("the Triton ... take")."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{kernels} float16, bfloat16 or float32, got {dtype}; use backend='torch'")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors live on one device."""
    present = [t for t in tensors.values() if t is not None]
    if all(t.device == present[0].device for t in present[1:]):
        return
    seen = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
    raise ValueError(f"all inputs must be on one device, got {seen}")


def check_dims_match(what: str, **dims) -> None:
    """Sizes (ints or shapes) that must agree (e.g. batch of q, k, v); the message lists each argument's size."""
    values = list(dims.values())
    if all(size == values[0] for size in values[1:]):
        return
    seen = ", ".join(f"{name}={tuple(size) if isinstance(size, torch.Size) else size}" for name, size in dims.items())
    raise ValueError(f"{what} must match, got {seen}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int]) -> None:
    """`x` must have exactly the shape `expected`."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
