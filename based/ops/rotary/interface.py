"""Public entry point of rotary embeddings: argument checks, then backend dispatch."""
from __future__ import annotations

import torch

from based.ops._backend import compiled_training, resolve_backend, triton_available
from based.ops._validate import KERNEL_DTYPES, check_same_device, check_tensor
from based.ops.rotary.reference import apply_rotary_torch


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, *,
                 backend: str = "auto") -> torch.Tensor:
    """Rotate `x` `[B, T, H, D]` (D even) by the positions `[T]` of its tokens, non-interleaved layout
    (pair i = channels i and i + D/2, angle `position * base**(-2i/D)`); computed in fp32.

    `positions` may be any integer tensor on x's device, e.g. `start + arange(T)` with `start` a 0-dim
    device tensor, so a decode step can be captured in a CUDA graph and replayed at later positions.
    backend: "auto" (on CUDA one Triton launch each way, except for training under torch.compile, where inductor
    fuses the reference into its neighbours as fast; else the reference), "torch" or "triton" (forward and
    backward). Returns a new tensor in x's dtype.
    """
    check_tensor("x", x, ndim=4)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(x=x, positions=positions)
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got x of shape {tuple(x.shape)}")
    if positions.shape[0] != x.shape[1]:
        raise ValueError(f"positions must have one entry per token of x {tuple(x.shape)}, got {tuple(positions.shape)}")
    if backend == "auto" and (x.dtype not in KERNEL_DTYPES or compiled_training(x)):
        backend = "torch"
    impl = resolve_backend("apply_rotary", backend, x.device, _implementations())
    return impl(x, positions, float(base))


def _implementations():
    impls = {"torch": apply_rotary_torch}
    if triton_available():
        from based.ops.rotary.triton_kernel import apply_rotary_triton  # noqa: PLC0415 (needs triton)

        impls["triton"] = apply_rotary_triton
    return impls
