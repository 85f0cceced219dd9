"""Backend choice shared by every op.

`"auto"` takes the fastest implementation the op has for the input's device: CUDA or Triton kernels on a
GPU, the PyTorch reference elsewhere. Forcing an implementation the op or the machine lacks is an error,
never a silent fallback.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Mapping

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on any of `tensors` (None entries skipped): the inference-only
    kernels then give way to the differentiable reference under "auto"."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_cast(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` as a matrix product sees them under `torch.autocast` on `device`: floating tensors in the
    autocast dtype, everything else (None, integers, a tensor outside autocast) unchanged. The ops whose core is a
    matrix product call it first, so that modules built on them run under autocast as `nn.Linear` does."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def compiled_training(*tensors: torch.Tensor | None) -> bool:
    """Whether torch.compile is tracing an op that needs gradients of `tensors`: there inductor fuses an
    elementwise op's reference, forward and backward, with its neighbours, and "auto" leaves it the reference
    where that beats the op's kernels (benchmarks/train_kernels.py)."""
    return torch.compiler.is_compiling() and grad_needed(*tensors)


def decode_launch(device: torch.device, programs: int, few: tuple[int, int], many: tuple[int, int],
                  interpreted_block: int) -> tuple[int, dict]:
    """(block size, launch options) of a decode kernel with `programs` programs: `few` (block, warps) when they
    do not fill the SMs (batch 1: latency-bound, so one big block), else `many` (bandwidth-bound); the Triton
    interpreter gets `interpreted_block` and no launch options (only `PDL=False`). Only the latency-bound launch is
    chained (`chain_options`): with the SMs full there is nothing to overlap, and chaining such a launch measured
    slower (docs/PERFORMANCE.md)."""
    if device.type != "cuda":
        return interpreted_block, dict(PDL=False)
    if programs < _multiprocessor_count(device):
        return few[0], dict(num_warps=few[1], **chain_options(device))
    return many[0], dict(num_warps=many[1], PDL=False)


# Cleared inside `chaining_disabled()`; a module-level flag because the kernels' wrappers, deep inside a model's
# forward, read it while a graph is captured.
_chaining_allowed = True


@contextlib.contextmanager
def chaining_disabled() -> Iterator[None]:
    """Launch every decode kernel unchained while the block runs (e.g. while a decode graph is captured that
    must not rely on programmatic dependent launch: `DecodeSession(chained=False)`)."""
    global _chaining_allowed
    previous, _chaining_allowed = _chaining_allowed, False
    try:
        yield
    finally:
        _chaining_allowed = previous


def chained_launch(device: torch.device) -> bool:
    """Whether to launch a decode kernel with programmatic dependent launch (PDL): on Hopper and newer, while a
    CUDA graph is being captured, unless inside `chaining_disabled()`. A chained kernel may start while the
    kernel before it finishes; it lets the next kernel start too and waits for the previous one before touching
    any activation or cache (the GEMV reads its weight tiles before waiting: weights must not be written inside
    the same graph). Eager decoding is bound by host launches, where chaining buys nothing, so it stays off
    there."""
    return (_chaining_allowed and device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def chain_options(device: torch.device) -> dict:
    """The arguments that chain a decode kernel (one with a `PDL` constexpr) when `chained_launch` says so:
    the constexpr and Triton's `launch_pdl` launch option."""
    return dict(PDL=True, launch_pdl=True) if chained_launch(device) else dict(PDL=False)


def cuda_extension_available() -> bool:
    try:
        from based import _C  # noqa: F401
    except ImportError:
        return False
    return True


def auto_backend(device: torch.device, implementations: Mapping[str, Callable],
                 auto_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The name of the implementation "auto" takes on `device` (see `resolve_backend`)."""
    if device.type == "cuda":
        for name in auto_order:
            if name in implementations and _supported(name, device):
                return name
    return "torch"


def resolve_backend(
    op: str,
    backend: str,
    device: torch.device,
    implementations: Mapping[str, Callable],
    auto_order: tuple[str, ...] = ("cuda", "triton"),
) -> Callable:
    """Return the implementation of `op` that `backend` names.

    `implementations` maps backend names to callables; "torch" must be among them. With "auto", the
    first of `auto_order` that the op implements and the machine supports is used on a CUDA device, and
    "torch" everywhere else.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return implementations[auto_backend(device, implementations, auto_order)]
    if backend not in implementations:
        have = ", ".join(sorted(implementations))
        raise ValueError(f"{op} has no {backend!r} backend (available: {have})")
    if not _supported(backend, device):
        raise ValueError(f"{op}: backend {backend!r} cannot run on {device}: {_why_unsupported(backend)}")
    return implementations[backend]


def _supported(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        # The Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors; tests use it.
        import os

        return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "cuda":
        return device.type == "cuda" and cuda_extension_available()
    return False


def _why_unsupported(backend: str) -> str:
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        return "Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)"
    return "the CUDA extension based._C is not built (pip install on a machine with nvcc and CUDA torch) or the tensor is not on a GPU"
