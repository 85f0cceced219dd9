"""Public entry points of sliding-window attention: argument checks, then backend dispatch."""
from __future__ import annotations

import math
from numbers import Real

import torch

from based.ops._backend import resolve_backend, triton_available
from based.ops._validate import KERNEL_DTYPES, check_positive_int, check_same_device, check_tensor
from based.ops.sliding_window.cache import WindowCache, check_kv, check_position, check_window_cache
from based.ops.sliding_window.reference import sliding_window_attention_step_torch, sliding_window_attention_torch


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal softmax attention restricted to the last `window` keys.

    Query i sits at key position `p = i + Tk - Tq` (bottom-right aligned, as in flash-attn, so a chunk
    of queries can continue from cached keys) and attends to keys `p - window < j <= p`; `window` counts
    the query's own key. `o_i = softmax_j(scale * q_i.k_j) v_j` over those keys.

    Args:
        q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`, with `1 <= Tq <= Tk` and H a
            multiple of Hkv (GQA/MQA: query head h uses kv head `h // (H // Hkv)`). fp16, bf16, fp32
            (fp64 on the torch backend), one dtype for all three. Any lengths.
        window: int >= 1. The released checkpoints' flash-attn `window_size=(w//2, 0)` is `w//2 + 1` here.
        scale: score scale, `1/sqrt(D)` when None.
        backend: "auto" (the Triton kernels on CUDA for fp16/bf16/fp32, else the reference), "torch" or
            "triton".

    Returns:
        `o` `[B, Tq, H, Dv]` in q's dtype, accumulated in fp32 (fp64 for fp64 inputs on the torch backend).
    Differentiable in q, k, v. Memory O(T * window), never O(Tq * Tk); the Triton kernels skip key blocks
    outside the window, so time is O(T * window) too.
    """
    check_qkv(q, k, v, seq_dim=True)
    check_positive_int("window", window)
    scale = _resolve_scale(scale, q)
    impl = resolve_backend("sliding_window_attention", _auto_backend(backend, q), q.device,
                           _implementations(parallel=True))
    return impl(q, k, v, window, scale)


def sliding_window_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: WindowCache, pos, *,
                                  scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """One decode step of sliding-window attention with window `W = cache.window`.

    Writes k, v into slot `pos % W` of `cache` **in place**, then attends over the slots holding
    positions `max(0, pos-W+1) .. pos`: the output `sliding_window_attention(..., window=W)` gives at
    position `pos`.

    Args:
        q: `[B, H, D]`; k: `[B, Hkv, D]`; v: `[B, Hkv, Dv]`, the token at absolute position `pos`.
        cache: `WindowCache` with k `[B, W, Hkv, D]`, v `[B, W, Hkv, Dv]` holding the earlier positions
            (`window_cache_write` after a prefill, or earlier steps).
        pos: a Python int >= 0, or a 0-dim int64 tensor on the cache's device. With a tensor nothing
            reads its value on the host, so the step can be captured in a CUDA graph and replayed with
            `pos` updated in place.
        scale: `1/sqrt(D)` when None.
        backend: "auto" (the Triton kernel on CUDA for fp16/bf16/fp32, else the reference), "torch" or
            "triton" (one fused launch: ring write + attention).

    Returns:
        `o` `[B, H, Dv]` in q's dtype.
    """
    check_qkv(q, k, v, seq_dim=False)
    check_window_cache(cache, k, v)
    check_position(pos, cache, allow_tensor=True)
    scale = _resolve_scale(scale, q)
    impl = resolve_backend("sliding_window_attention_step", _auto_backend(backend, q), q.device,
                           _implementations(parallel=False))
    return impl(q, k, v, cache, pos, scale)


def _auto_backend(backend: str, q: torch.Tensor) -> str:
    """`backend`, with "auto" sent to the reference for inputs the kernels do not take (fp64)."""
    return "torch" if backend == "auto" and q.dtype not in KERNEL_DTYPES else backend


def _implementations(parallel: bool):
    impls = {"torch": sliding_window_attention_torch if parallel else sliding_window_attention_step_torch}
    if triton_available():
        from based.ops.sliding_window import triton_op  # noqa: PLC0415 (needs triton)

        impls["triton"] = (triton_op.sliding_window_attention_triton if parallel
                           else triton_op.sliding_window_attention_step_triton)
    return impls


def check_qkv(q, k, v, *, seq_dim: bool) -> None:
    check_kv(k, v, seq_dim=seq_dim)
    check_tensor("q", q, ndim=k.dim())
    check_same_device(q=q, k=k, v=v)
    if q.dtype != k.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype} and k, v {k.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch and head dim of q and k must match, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    H, Hkv = q.shape[-2], k.shape[-2]
    if H % Hkv:
        raise ValueError(f"heads of q must be a multiple of heads of k and v (GQA), got q {tuple(q.shape)} "
                         f"with {H} heads and k {tuple(k.shape)} with {Hkv}")
    if seq_dim and q.shape[1] > k.shape[1]:
        raise ValueError(f"seqlen of q must be <= seqlen of k (queries align to the last keys), "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")


def _resolve_scale(scale, q: torch.Tensor) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return float(scale)
