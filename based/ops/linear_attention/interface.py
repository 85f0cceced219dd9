"""Public entry points of Taylor linear attention: argument checks, then backend dispatch."""
from __future__ import annotations

import functools

import torch

from based.ops._backend import auto_backend, cuda_extension_available, resolve_backend, triton_available
from based.ops._validate import (
    KERNEL_DTYPES, check_bool, check_dims_match, check_nonnegative, check_same_device, check_shape, check_tensor,
)
from based.ops.feature_map.reference import feature_dim_of
from based.ops.linear_attention import cuda_op
from based.ops.linear_attention.reference import linear_attention_step_torch, linear_attention_torch
from based.ops.linear_attention.state import LinearAttentionState, accumulation_dtype

STATE_DTYPES = (torch.float32, torch.float64)
# The step's "auto" order, Triton first: it streams the state closer to the copy bandwidth than the CUDA kernel
# (benchmarks/decode.py; docs/PERFORMANCE.md).
STEP_AUTO_ORDER = ("triton", "cuda")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     normalize: bool = True, eps: float = 1e-6,
                     initial_state: LinearAttentionState | None = None, return_state: bool = False,
                     backend: str = "auto"):
    """Taylor (second-order) linear attention over a whole sequence.

    `o_i = sum_{j in S(i)} a_ij v_j / (sum_{j in S(i)} a_ij + eps)`, `a_ij = 1 + s + s*s/2`,
    `s = q_i.k_j / sqrt(d)`, with `S(i) = {j <= i}` when `causal` else all j. `normalize=False` drops the
    division. With `initial_state`, its sums count as keys before position 0 (continuing a prompt).

    Args:
        q, k: `[B, T, H, d]`; v: `[B, T, H, dv]`. fp16, bf16, fp32 (fp64 on the torch backend). Any T >= 1.
        initial_state: optional `LinearAttentionState` with kv `[B, H, E, dv]` and ksum `[B, H, E]`,
            `E = 1 + d + d*(d+1)/2`, fp32 (fp64 allowed with fp64 inputs).
        return_state: also return the final state (initial state included).
        backend: "auto" (on CUDA: the Hopper kernels where they apply, else the Triton kernels for
            fp16/bf16/fp32 and d <= 16; else the reference), "torch", "triton" or "cuda" (the Hopper kernels,
            forward and backward: compute capability 9.0 and `based._C` built with CUTLASS; causal, fp16/bf16,
            d = 16, dv in {64, 112, 128}).

    Returns:
        `o` `[B, T, H, dv]` in v's dtype, and with `return_state` a `LinearAttentionState` (fp32).
    Differentiable in q, k, v and the initial state. Memory O(T).
    """
    _check_qkv(q, k, v, seq_dim=True)
    if initial_state is not None:
        _check_state(initial_state, q, v)
    for name, flag in (("causal", causal), ("normalize", normalize), ("return_state", return_state)):
        check_bool(name, flag)
    check_nonnegative("eps", eps)
    if backend == "auto":
        if cuda_op.unsupported_reason(q, v, causal) is None:
            return cuda_op.apply(q, k, v, normalize, eps, initial_state, return_state)
        if not _kernels_support(q):
            backend = "torch"
    impl = resolve_backend("linear_attention", backend, q.device, _parallel_implementations(),
                           auto_order=("triton",))
    return impl(q, k, v, causal, normalize, eps, initial_state, return_state)


def _kernels_support(q: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs ("auto" uses the reference for the rest)."""
    return q.dtype in KERNEL_DTYPES and q.shape[-1] <= 16


@functools.cache
def _parallel_implementations():
    impls = {"torch": linear_attention_torch}
    if cuda_op.KERNEL_BUILT:
        impls["cuda"] = cuda_op.linear_attention_cuda
    if triton_available():
        from based.ops.linear_attention.triton_op import linear_attention_triton  # noqa: PLC0415 (needs triton)

        impls["triton"] = linear_attention_triton
    return impls


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState, *,
                          normalize: bool = True, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """One recurrent (decode) step of causal Taylor linear attention.

    Adds `phi(k) outer v` to `state.kv` and `phi(k)` to `state.ksum` **in place**, then returns the output
    the parallel op gives at this position.

    Args:
        q, k: `[B, H, d]`; v: `[B, H, dv]`; fp16, bf16, fp32 (fp64 on the torch backend).
        state: `LinearAttentionState` (kv `[B, H, E, dv]`, ksum `[B, H, E]`, fp32 or fp64), updated in place.
        backend: "auto" (on CUDA the Triton kernel, else the `based._C` one when built, for fp16/bf16/fp32
            inputs with d <= 32 and a contiguous fp32 state; else the reference), "torch", "triton" or "cuda".
            The fused kernels read and write the state once and never sync with the host (CUDA-graph safe).

    Returns:
        `o` `[B, H, dv]` in v's dtype.
    """
    _check_qkv(q, k, v, seq_dim=False)
    _check_state(state, q, v)
    check_bool("normalize", normalize)
    check_nonnegative("eps", eps)
    if backend == "auto" and not _step_kernels_support(q, state):
        backend = "torch"
    impl = resolve_backend("linear_attention_step", backend, q.device, _step_implementations(),
                           auto_order=STEP_AUTO_ORDER)
    return impl(q, k, v, state, normalize, eps)


def step_backend(device: torch.device) -> str:
    """The backend `linear_attention_step(..., backend="auto")` runs on `device` for inputs its kernels take."""
    return auto_backend(device, _step_implementations(), STEP_AUTO_ORDER)


def _step_kernels_support(q: torch.Tensor, state: LinearAttentionState) -> bool:
    """Inputs every fused step kernel takes ("auto" uses the reference for the rest)."""
    return (q.dtype in KERNEL_DTYPES and q.shape[-1] <= 32 and state.kv.dtype == torch.float32
            and state.kv.is_contiguous() and state.ksum.is_contiguous())


def _step_implementations():
    impls = {"torch": linear_attention_step_torch}
    if cuda_extension_available():
        from based.ops.linear_attention.cuda_step import linear_attention_step_cuda  # noqa: PLC0415

        impls["cuda"] = linear_attention_step_cuda
    if triton_available():
        from based.ops.linear_attention.triton_step import linear_attention_step_triton  # noqa: PLC0415

        impls["triton"] = linear_attention_step_triton
    return impls


def _check_qkv(q, k, v, *, seq_dim: bool) -> None:
    ndim, layout = (4, "[B, T, H, d]") if seq_dim else (3, "[B, H, d]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        try:
            check_tensor(name, x, ndim=ndim)
        except ValueError as err:
            raise ValueError(f"{err} (expected {layout})") from None
    check_same_device(q=q, k=k, v=v)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    what = "batch, seqlen and heads" if seq_dim else "batch and heads"
    check_dims_match(f"{what} of q and v", q=q.shape[:-1], v=v.shape[:-1])
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_state(state, q, v) -> None:
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a LinearAttentionState, got {type(state).__name__}")
    B, H, d, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    E = feature_dim_of(d)
    check_tensor("state.kv", state.kv, ndim=4, dtypes=STATE_DTYPES)
    check_tensor("state.ksum", state.ksum, ndim=3, dtypes=STATE_DTYPES)
    check_shape("state.kv", state.kv, (B, H, E, dv))
    check_shape("state.ksum", state.ksum, (B, H, E))
    check_same_device(q=q, **{"state.kv": state.kv, "state.ksum": state.ksum})
    if state.kv.dtype != accumulation_dtype(v.dtype) and state.kv.dtype != torch.float32:
        raise TypeError(f"state must be float32 for {v.dtype} inputs, got {state.kv.dtype}")
