"""The `based._C` CUDA kernel for the feature map (a small kernel that keeps the extension build honest)."""
from __future__ import annotations

import torch

from based.ops._validate import KERNEL_DTYPES

MAX_FEATURE_DIM = 64  # kMaxFeatureMapDim in csrc/launchers.h


def taylor_feature_map_cuda(x: torch.Tensor) -> torch.Tensor:
    # Checked here as well as in C++: an extension built with a compiler other than torch's can crash the
    # process on a C++ exception instead of raising (docs/PERFORMANCE.md, "Build notes"), so the public path
    # never relies on the C++ checks.
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the CUDA kernel supports float32, float16, bfloat16")
    if x.shape[-1] > MAX_FEATURE_DIM:
        raise ValueError(f"the last dimension of x must be in [1, {MAX_FEATURE_DIM}] for the CUDA kernel, "
                         f"got shape {tuple(x.shape)}")
    from based import _C  # noqa: F401  (importing registers torch.ops.based.*)

    return torch.ops.based.taylor_feature_map(x)
