"""The fused CUDA decode step of Taylor linear attention: `based._C`'s `torch.ops.based.linear_attention_step`.

One launch per step, one thread block per (batch, head): the block builds phi(q) and phi(k) in shared memory and
streams the head's fp32 state once, adding phi(k) outer v to kv and phi(k) to ksum in place while it accumulates
the output. Same semantics as `reference.linear_attention_step_torch`; nothing is read back on the host, so the
step can be captured in a CUDA graph. Kernel: kernels/linear_attention_step.cu; host code and C++ checks:
csrc/linear_attention_step.cpp.
"""
from __future__ import annotations

import torch

from based.ops._validate import KERNEL_DTYPES
from based.ops.linear_attention.state import LinearAttentionState

MAX_FEATURE_DIM = 32  # kMaxStepFeatureDim in csrc/launchers.h
MAX_VALUE_DIM = 256  # kMaxStepValueDim in csrc/launchers.h


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState) -> None:
    """Raise ValueError/TypeError for inputs that the kernel does not take. Ranks, shapes and matching devices are
    checked before dispatch by `based.ops.linear_attention_step`.

    Checked here as well as in C++ for the reason given in feature_map/cuda.py.
    """
    if q.dtype not in KERNEL_DTYPES or len({q.dtype, k.dtype, v.dtype}) > 1:
        raise TypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the CUDA kernel takes one of "
                        "float32, float16, bfloat16 for all three")
    if not 1 <= q.shape[-1] <= MAX_FEATURE_DIM:
        raise ValueError(f"the last dimension of q must be in [1, {MAX_FEATURE_DIM}] for the CUDA kernel, "
                         f"got shape {tuple(q.shape)}")
    if not 1 <= v.shape[-1] <= MAX_VALUE_DIM:
        raise ValueError(f"the last dimension of v must be in [1, {MAX_VALUE_DIM}] for the CUDA kernel, "
                         f"got shape {tuple(v.shape)}")
    for name, x in (("state.kv", state.kv), ("state.ksum", state.ksum)):
        if x.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {x.dtype}; the CUDA kernel needs a float32 state")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CUDA kernel (it is updated in place), "
                             f"got strides {x.stride()}")
    if q.device.type != "cuda":
        raise ValueError(f"the CUDA kernel needs CUDA tensors, got q on {q.device}")


def linear_attention_step_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState,
                               normalize: bool, eps: float) -> torch.Tensor:
    """Same contract as `reference.linear_attention_step_torch`: updates `state` in place and returns `o`
    `[B, H, dv]` in v's dtype. q, k, v may be strided (they are copied to contiguous rows when they are not)."""
    check_kernel_inputs(q, k, v, state)
    from based import _C  # noqa: F401  (importing registers torch.ops.based.*)

    return torch.ops.based.linear_attention_step(q, k, v, state.kv, state.ksum, normalize, eps)
