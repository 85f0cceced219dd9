"""Public entry point of the fused linear op: argument checks, then backend dispatch."""
from __future__ import annotations

import torch

from based.ops._backend import autocast_cast, grad_needed, resolve_backend, triton_available
from based.ops._validate import KERNEL_DTYPES, check_same_device, check_shape, check_tensor
from based.ops.linear.reference import linear_torch, stacked_linear_torch


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None, gated: bool = False, norm_weight: torch.Tensor | None = None,
           norm_eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """`F.linear(x, weight, bias)`, optionally after an RMSNorm of x and followed by the SwiGLU gate and a
    residual add.

    With `norm_weight`, x is replaced by `rms_norm(x, norm_weight, norm_eps)` first: a pre-norm block's norm
    and the projection after it, which the Triton kernel does in one launch (each program normalises the row
    itself, so there is no kernel boundary between them; the normalised row stays in fp32 there, where the
    reference rounds it to the weight's dtype).

    With `gated`, the weight's first half of rows makes the value and its second half the gate (the layout
    of `GatedMlp.fc1`), and the result is `value * silu(gate)`. (BaseConv's conv gate after its in_proj is
    `based.ops.linear_gated_conv1d_step`.) With `residual`, the result is `residual + y`, in the promoted dtype
    of the two (the blocks' fp32 residual stream).

    Args:
        x: `[..., in_features]`; fp16, bf16, fp32 (fp64 on the torch backend). Without a norm weight, the
            weight's dtype; with one, any of these (the blocks pass their fp32 residual stream).
        weight: `[out_features, in_features]` (`[2 * out_features, in_features]` when gated).
        bias: optional `[weight.shape[0]]`, x's dtype.
        residual: optional `[..., out_features]`, x's leading dims.
        norm_weight: optional `[in_features]`, the weight's dtype; `norm_eps` >= 0 goes with it.
        backend: "auto" (the Triton matrix-vector kernel on CUDA for a single row of x, as a batch-1 decode
            step has, when no gradient is needed; else the reference, cuBLAS plus elementwise ops),
            "torch" or "triton" (one row only, inference only: its output carries no gradient).

    Under `torch.autocast`, weight, bias, norm_weight and (without a norm) x are cast to the autocast dtype
    first, as `F.linear` would.

    Returns:
        `[..., out_features]` in the weight's dtype, or in the promoted dtype of weight and residual with a
        residual. The Triton kernel accumulates in fp32 and applies bias, gate and residual before
        rounding once.

    While a CUDA graph is captured on Hopper or newer, the Triton kernel is chained to the kernel before it
    (programmatic dependent launch) and reads its weight tiles before that kernel ends: a weight written
    earlier in the same graph would be read stale. Write weights between replays.
    """
    x, norm_weight, (weight, bias) = _under_autocast(x, norm_weight, weight, bias)
    check_linear_input(x, weight, norm_weight, norm_eps)
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
    rows = weight.shape[0]
    if bias is not None:
        check_weight_vector("bias", bias, rows, weight.dtype)
    out_features = gated_halves(weight) if gated else rows
    if residual is not None:
        check_tensor("residual", residual, ndim=None)
        check_shape("residual", residual, (*x.shape[:-1], out_features))
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, norm_weight=norm_weight)
    if backend == "auto" and not gemv_supports(x, weight, bias, residual, norm_weight):
        backend = "torch"
    impl = resolve_backend("linear", backend, x.device, _implementations())
    return impl(x, weight, bias, residual, gated, norm_weight, float(norm_eps))


def stacked_linear(x: torch.Tensor, weights, *, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-5,
                   backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """`tuple(linear(x, w, norm_weight=norm_weight, norm_eps=norm_eps) for w in weights)`: several projections of
    one input, such as a layer's separate q, k and v weights, without biases.

    For a single row of x (a batch-1 decode step) the Triton kernel computes them in one launch over the
    weights' rows in turn, so the layer pays one kernel boundary instead of three; the reference normalises x
    once and calls cuBLAS per weight.

    Args:
        x: `[..., in_features]`, as for `linear`.
        weights: a list or tuple of one to three `[rows_i, in_features]` matrices of one dtype.
        norm_weight, norm_eps, backend: as for `linear`.

    Returns:
        a tuple of `[..., rows_i]` in the weights' dtype.
    """
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= 3:
        raise TypeError(f"weights must be a list or tuple of one to three matrices, got {weights!r:.80}")
    x, norm_weight, weights = _under_autocast(x, norm_weight, *weights)
    for weight in weights:
        check_linear_input(x, weight, norm_weight, norm_eps)
        if weight.dtype != weights[0].dtype:
            raise TypeError(f"weights must share a dtype, got {weights[0].dtype} and {weight.dtype}")
    check_same_device(x=x, norm_weight=norm_weight, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    if backend == "auto" and not all(gemv_supports(x, w, None, None, norm_weight) for w in weights):
        backend = "torch"
    impl = resolve_backend("stacked_linear", backend, x.device, _implementations(stacked=True))
    return impl(x, tuple(weights), norm_weight, float(norm_eps))


def _under_autocast(x, norm_weight, *weights):
    """(x, norm_weight, weights) as the product sees them under `torch.autocast`: the weights (bias included) and
    the norm weight in the autocast dtype; x too without a norm. With a norm, x is the residual stream and keeps its
    dtype: the norm runs in fp32 and rounds its output to the weight's dtype, as autocast's fp32 norm followed by a
    bf16 matrix product would. A non-tensor x is left to the checks."""
    if not isinstance(x, torch.Tensor):
        return x, norm_weight, weights
    *weights, norm_weight = autocast_cast(x.device, *weights, norm_weight)
    if norm_weight is None:
        x, = autocast_cast(x.device, x)
    return x, norm_weight, tuple(weights)


def check_linear_input(x, weight, norm_weight, norm_eps) -> None:
    """x against one weight, and the norm that may come before it."""
    check_tensor("x", x, ndim=None)
    check_tensor("weight", weight, ndim=2)
    in_features = weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal weight's in_features ({in_features})")
    if norm_weight is None and x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if norm_weight is not None:
        check_weight_vector("norm_weight", norm_weight, in_features, weight.dtype)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps < 0:
            raise ValueError(f"norm_eps must be a number >= 0, got {norm_eps!r}")


def check_weight_vector(name: str, tensor: torch.Tensor, size: int, dtype: torch.dtype) -> None:
    """A bias or norm weight: `[size]` in the weight's dtype."""
    check_tensor(name, tensor, ndim=1)
    check_shape(name, tensor, (size,))
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have weight's dtype {dtype}, got {tensor.dtype}")


def gated_halves(weight: torch.Tensor) -> int:
    """The rows of each half of a weight that stacks value and gate rows."""
    rows = weight.shape[0]
    if rows % 2:
        raise ValueError(f"a gated weight stacks value and gate rows, so needs an even row count, got {rows}")
    return rows // 2


def gemv_supports(x, weight, bias, residual, norm_weight, *more) -> bool:
    """Whether "auto" may take the Triton matrix-vector kernel: one row of x, kernel dtypes, no gradient.
    `more`: further tensors the kernel reads (BaseConv's conv state and weight)."""
    tensors = (x, weight, bias, residual, norm_weight, *more)
    return (not grad_needed(*tensors) and x.numel() == x.shape[-1] > 0 and weight.shape[0] > 0
            and all(t is None or t.dtype in KERNEL_DTYPES for t in tensors))


def _implementations(stacked: bool = False):
    impls = {"torch": stacked_linear_torch if stacked else linear_torch}
    if triton_available():
        from based.ops.linear import triton_gemv  # noqa: PLC0415 (needs triton)

        impls["triton"] = triton_gemv.stacked_linear_triton if stacked else triton_gemv.linear_triton
    return impls
