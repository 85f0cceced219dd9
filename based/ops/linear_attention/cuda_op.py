"""The Hopper kernels as the "cuda" backend of `linear_attention`.

`torch.ops.based.linear_attention_fwd_sm90` and `..._bwd_sm90` (kernels: kernels/sm90/linear_attention_{fwd,bwd}.cuh;
host code and C++ checks: csrc/sm90/linear_attention.cpp) run the causal forward and its gradients on compute
capability 9.0 for d = 16, dv in {64, 112, 128} and fp16/bf16 inputs, with the initial and final state in the
public layout; `torch.ops.based.linear_attention_sm90` is the two as one differentiable op, its autograd node in
C++ (a training call at a few thousand tokens is bound by host time). They exist only when `based._C` was built
with the CUTLASS headers. The backward reads the normaliser the forward saves.
"""
from __future__ import annotations

import functools

import torch

from based.ops._backend import cuda_extension_available
from based.ops.linear_attention.state import LinearAttentionState

FEATURE_DIM = 16
VALUE_DIMS = (64, 112, 128)  # kFwdSm90ValueDims in kernels/sm90/linear_attention_fwd.h
DTYPES = (torch.float16, torch.bfloat16)


def _kernel_built() -> bool:
    if not cuda_extension_available():
        return False
    from based import _C  # noqa: F401  (importing registers torch.ops.based.*)

    return hasattr(torch.ops.based, "linear_attention_fwd_sm90")


# Whether based._C has the Hopper forward (it was built with the CUTLASS headers). Decided once at import:
# torch.compile traces the dispatch, and an import attempt inside it is a graph break.
KERNEL_BUILT = _kernel_built()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if not KERNEL_BUILT:
        return "based._C was built without the Hopper kernels (no CUDA extension, or no CUTLASS headers)"
    if q.device.type != "cuda":
        return f"it needs CUDA tensors, got q on {q.device}"
    capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return f"it needs a compute capability 9.0 GPU, got {capability}"
    if not causal:
        return "it is causal only"
    if q.dtype not in DTYPES:
        return f"it takes float16 or bfloat16 inputs, got {q.dtype}"
    if q.shape[-1] != FEATURE_DIM:
        return f"it takes a feature dim of {FEATURE_DIM}, got q of shape {tuple(q.shape)}"
    if v.shape[-1] not in VALUE_DIMS:
        return f"it takes a value dim in {VALUE_DIMS}, got v of shape {tuple(v.shape)}"
    return None


def linear_attention_cuda(q, k, v, causal: bool, normalize: bool, eps: float,
                          initial_state: LinearAttentionState | None, return_state: bool):
    """Same contract as `reference.linear_attention_torch`, forward on the Hopper kernel (see the module
    docstring for the inputs it takes; others raise ValueError/TypeError naming the reason)."""
    if q.dtype not in DTYPES:
        raise TypeError(f"linear_attention(backend='cuda') takes float16 or bfloat16 inputs, got {q.dtype}")
    reason = unsupported_reason(q, v, causal)
    if reason is not None:
        raise ValueError(f"linear_attention(backend='cuda'): {reason}")
    return apply(q, k, v, normalize, eps, initial_state, return_state)


def apply(q, k, v, normalize: bool, eps: float, initial_state: LinearAttentionState | None, return_state: bool):
    """`linear_attention_cuda` for inputs `unsupported_reason` has accepted."""
    kv0 = ksum0 = None
    if initial_state is not None:
        kv0, ksum0 = initial_state.kv.float(), initial_state.ksum.float()
    o, kv, ksum = torch.ops.based.linear_attention_sm90.default(q, k, v, kv0, ksum0, normalize, eps, return_state)
    return (o, LinearAttentionState(kv, ksum)) if return_state else o
