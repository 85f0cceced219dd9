"""Public entry points of the causal depthwise convolution: argument checks, then backend dispatch."""
from __future__ import annotations

import torch

from based.ops._backend import grad_needed, resolve_backend, triton_available
from based.ops._validate import (
    KERNEL_DTYPES, check_bool, check_dims_match, check_same_device, check_shape, check_tensor,
)
from based.ops.linear.interface import check_linear_input, check_weight_vector, gated_halves, gemv_supports, linear
from based.ops.short_conv.reference import (causal_conv1d_step_torch, causal_conv1d_torch, gated_conv1d_step_torch,
                                            gated_conv1d_torch, linear_gated_conv1d_step_torch)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  initial_state: torch.Tensor | None = None, return_state: bool = False, backend: str = "auto"):
    """Causal depthwise 1-D convolution over the sequence (BaseConv's short conv).

    `y_t = sum_{i<K} weight[:, i] * x_{t-K+1+i} + bias`, where inputs before the chunk are zeros or,
    with `initial_state`, the inputs that came before it (continuing a prompt).

    Args:
        x: `[B, T, D]`, any T >= 1. fp16, bf16, fp32 (fp64 on the torch backend).
        weight: `[D, K]` (an `nn.Conv1d(D, D, K, groups=D)` weight `[D, 1, K]` squeezed).
        bias: optional `[D]`.
        initial_state: optional `[B, D, K]`, the last K inputs before `x`, oldest first (only the newest
            K - 1 enter the output; the state keeps K so a decode step can shift-then-dot).
        return_state: also return the state after `x`.
        backend: "auto" (the Triton kernels on CUDA for fp16/bf16/fp32 inputs, else the reference), "torch" or
            "triton" (forward and backward kernels in the `[B, T, D]` layout).

    Returns:
        `y` `[B, T, D]` in x's dtype, computed in fp32 (fp64 for fp64 inputs); with `return_state` also
        the new state `[B, D, K]` in fp32 (fp64): the last K inputs, oldest first, including
        `initial_state`'s when T < K. Differentiable in x, weight, bias and initial_state.
    """
    backend = _check_conv(x, None, weight, bias, initial_state, return_state, backend)
    impl = resolve_backend("causal_conv1d", backend, x.device, _conv_implementations())
    return impl(x, weight, bias, initial_state, return_state)


def gated_conv1d(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 initial_state: torch.Tensor | None = None, return_state: bool = False, backend: str = "auto"):
    """BaseConv's gated short conv over a sequence: `silu(causal_conv1d(x, weight, bias, ...)) * gate`.

    Args:
        x: `[B, T, D]` (BaseConv's `u1`), any T >= 1. fp16, bf16, fp32 (fp64 on the torch backend).
        gate: `[B, T, D]` (BaseConv's `u2`), x's dtype; x and gate may be the two halves of one projection.
        weight, bias, initial_state, return_state: as `causal_conv1d`.
        backend: "auto" (as `causal_conv1d`), "torch" (rounds the conv output to x's dtype before silu and
            the gate, as BaseConv's unfused forward does) or "triton" (conv, silu and gate in one pass, forward
            and backward kernels, in fp32 until the single rounding of each output).

    Returns:
        `silu(y) * gate` `[B, T, D]` in x's dtype; with `return_state` also the new state, as `causal_conv1d`.
        Differentiable in x, gate, weight, bias and initial_state.
    """
    backend = _check_conv(x, gate, weight, bias, initial_state, return_state, backend)
    impl = resolve_backend("gated_conv1d", backend, x.device, _conv_implementations(gated=True))
    return impl(x, gate, weight, bias, initial_state, return_state)


def _check_conv(x, gate, weight, bias, initial_state, return_state, backend: str) -> str:
    """The checks of `causal_conv1d` and `gated_conv1d` (gate None for the first); the backend with "auto"
    narrowed to "torch" for dtypes no kernel takes."""
    check_tensor("x", x, ndim=3)
    if gate is not None:
        _check_gate(gate, x)
    _check_weight(weight, bias, x)
    if initial_state is not None:
        _check_state("initial_state", initial_state, x, weight)
    check_same_device(x=x, gate=gate, weight=weight, bias=bias, initial_state=initial_state)
    check_bool("return_state", return_state)
    return "torch" if backend == "auto" and x.dtype not in KERNEL_DTYPES else backend


def _check_gate(gate, x) -> None:
    check_tensor("gate", gate, ndim=x.ndim)
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if gate.dtype != x.dtype:
        raise TypeError(f"gate must have x's dtype {x.dtype}, got {gate.dtype}")


def _conv_implementations(gated: bool = False):
    impls = {"torch": gated_conv1d_torch if gated else causal_conv1d_torch}
    if triton_available():
        from based.ops.short_conv import triton_conv  # noqa: PLC0415 (needs triton)

        impls["triton"] = triton_conv.gated_conv1d_triton if gated else triton_conv.causal_conv1d_triton
    return impls


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """One decode step of `causal_conv1d`.

    Shifts `conv_state` left by one and writes `x` at its end **in place**, then returns
    `sum_i weight[:, i] * conv_state[:, :, i] + bias`: what the parallel op gives at this position.
    No host syncs, so the step can be captured in a CUDA graph.

    Args:
        x: `[B, D]`, the new input. fp16, bf16, fp32 (fp64 on the torch backend).
        conv_state: `[B, D, K]`, the last K inputs, oldest first (fp32 recommended; `x` is cast to it).
        weight: `[D, K]`; bias: optional `[D]`.
        backend: "auto" (the Triton kernel on CUDA for fp16/bf16/fp32 inputs, else the reference), "torch"
            or "triton" (shift, write and dot product in one launch).

    Returns:
        `y` `[B, D]` in x's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    _check_step(x, conv_state, weight, bias)
    impl = resolve_backend("causal_conv1d_step", _auto_step_backend(backend, x, conv_state, weight, bias),
                           x.device, _step_implementations(gated=False))
    return impl(x, conv_state, weight, bias)


def gated_conv1d_step(x: torch.Tensor, gate: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """One decode step of BaseConv's gated short conv: `silu(causal_conv1d_step(x, ...)) * gate`.

    Advances `conv_state` **in place** exactly as `causal_conv1d_step` does. No host syncs, so the step
    can be captured in a CUDA graph.

    Args:
        x: `[B, D]`, the new conv input (BaseConv's `u1`). fp16, bf16, fp32 (fp64 on the torch backend).
        gate: `[B, D]`, same dtype and device as `x` (BaseConv's `u2`).
        conv_state: `[B, D, K]`, the last K inputs, oldest first (fp32 recommended; `x` is cast to it).
        weight: `[D, K]`; bias: optional `[D]`.
        backend: "auto" (the Triton kernel on CUDA for fp16/bf16/fp32 inputs, else the reference), "torch"
            (rounds the conv output to x's dtype before the gate, as BaseConv's parallel forward does) or
            "triton" (conv, silu and gate in one launch, in fp32 until the single rounding of the output).

    Returns:
        `silu(y) * gate` `[B, D]` in x's dtype.
    """
    _check_step(x, conv_state, weight, bias)
    _check_gate(gate, x)
    check_same_device(x=x, gate=gate)
    impl = resolve_backend("gated_conv1d_step", _auto_step_backend(backend, x, gate, conv_state, weight, bias),
                           x.device, _step_implementations(gated=True))
    return impl(x, gate, conv_state, weight, bias)


def linear_gated_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             conv_state: torch.Tensor, conv_weight: torch.Tensor, *,
                             norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-5,
                             backend: str = "auto") -> torch.Tensor:
    """One decode step of BaseConv from its input to its gated conv: `gated_conv1d_step(u1, u2, conv_state,
    conv_weight)` with `u1, u2 = F.linear(norm(x), weight, bias).chunk(2, -1)` (BaseConv's in_proj), where
    `norm` is `rms_norm(., norm_weight, norm_eps)` when a norm weight is given (the block's pre-norm) and the
    identity otherwise.

    Advances `conv_state` **in place** as `causal_conv1d_step` does. No host syncs, so the step can be
    captured in a CUDA graph. It exists so that a batch-1 BaseConv token costs two launches: the Triton
    matrix-vector kernel of the in_proj normalises x, and the program that owns channel c computes `u1[c]` and
    `u2[c]`, advances channel c's conv state and applies silu and the gate, all in registers.

    Args:
        x: `[B, in_features]`; fp16, bf16, fp32 (fp64 on the torch backend). The weight's dtype, or any of
            these with a norm weight (the blocks pass their fp32 residual stream).
        weight: `[2 * D, in_features]`, the `u1` rows then the `u2` rows (BaseConv's in_proj).
        bias: `[2 * D]` in the weight's dtype, or None.
        conv_state: `[B, D, K]`, the last K conv inputs, oldest first (fp32 recommended; `u1` is cast to it).
        conv_weight: `[D, K]`.
        norm_weight: optional `[in_features]`, the weight's dtype; `norm_eps` >= 0 goes with it.
        backend: "auto" (on CUDA when no gradient is needed: for one row of x, B == 1, the Triton
            matrix-vector kernel; for several, `based.ops.linear` (cuBLAS) then `gated_conv1d_step`'s own kernel;
            else the reference), "torch" (`based.ops.linear` then `gated_conv1d_step`, each a reference)
            or "triton" (one row only, inference only; the normalised x, products, conv and gate stay in fp32
            until the single rounding of the output).

    Returns:
        `silu(conv(u1)) * u2` `[B, D]` in the weight's dtype.

    Raises:
        ValueError: a shape that does not fit the above (an odd number of weight rows, any empty dimension:
            the rule of every op), tensors on different devices, a negative norm_eps, or "triton" for several
            rows.
        TypeError: a non-tensor argument, an unsupported dtype, or x, bias or norm_weight in a dtype the
            weight does not allow.
    """
    check_tensor("x", x, ndim=2)
    check_linear_input(x, weight, norm_weight, norm_eps)
    D = gated_halves(weight)
    if bias is not None:
        check_weight_vector("bias", bias, 2 * D, weight.dtype)
    check_tensor("conv_state", conv_state, ndim=3)
    check_shape("conv_state", conv_state, (x.shape[0], D, conv_state.shape[-1]))
    check_tensor("conv_weight", conv_weight, ndim=2)
    check_shape("conv_weight", conv_weight, (D, conv_state.shape[-1]))
    check_same_device(x=x, weight=weight, bias=bias, conv_state=conv_state, conv_weight=conv_weight,
                      norm_weight=norm_weight)
    several_rows_on_gpu = x.is_cuda and x.shape[0] > 1
    if backend == "auto" and several_rows_on_gpu and not _reference_only(x, weight, bias, norm_weight, conv_state,
                                                                          conv_weight):
        # Several rows (batched decoding): a GEMM, then the step kernel streams the conv states.
        u1, u2 = linear(x, weight, bias, norm_weight=norm_weight, norm_eps=norm_eps).chunk(2, dim=-1)
        return gated_conv1d_step(u1, u2, conv_state, conv_weight)
    if backend == "auto" and not gemv_supports(x, weight, bias, None, norm_weight, conv_state, conv_weight):
        backend = "torch"
    impls = {"torch": linear_gated_conv1d_step_torch}
    if triton_available():
        from based.ops.linear import triton_gemv  # noqa: PLC0415 (needs triton)

        impls["triton"] = triton_gemv.linear_gated_conv1d_step_triton
    impl = resolve_backend("linear_gated_conv1d_step", backend, x.device, impls)
    return impl(x, weight, bias, conv_state, conv_weight, norm_weight, float(norm_eps))


def _check_step(x, conv_state, weight, bias) -> None:
    check_tensor("x", x, ndim=2)
    _check_weight(weight, bias, x)
    _check_state("conv_state", conv_state, x, weight)
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)


def _auto_step_backend(backend: str, x: torch.Tensor, *tensors) -> str:
    """`backend`, with "auto" sent to the reference for inputs the kernel does not take (fp64, or a gradient
    needed: the kernel is inference only)."""
    return "torch" if backend == "auto" and _reference_only(x, *tensors) else backend


def _reference_only(x: torch.Tensor, *tensors) -> bool:
    """Whether only the reference takes these inputs: fp64, or a gradient needed."""
    return x.dtype not in KERNEL_DTYPES or grad_needed(x, *tensors)


def _step_implementations(gated: bool):
    impls = {"torch": gated_conv1d_step_torch if gated else causal_conv1d_step_torch}
    if triton_available():
        from based.ops.short_conv import triton_step  # noqa: PLC0415 (needs triton)

        impls["triton"] = triton_step.gated_conv1d_step_triton if gated else triton_step.causal_conv1d_step_triton
    return impls


def _check_weight(weight, bias, x: torch.Tensor) -> None:
    check_tensor("weight", weight, ndim=2)
    check_dims_match("channels of x and weight", x=x.shape[-1], weight=weight.shape[0])
    if 0 in weight.shape:
        raise ValueError(f"weight must be [D, K] with D, K >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (weight.shape[0],))


def _check_state(name: str, state, x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor(name, state, ndim=3)
    check_shape(name, state, (x.shape[0], *weight.shape))
