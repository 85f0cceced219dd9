"""The Triton sliding-window kernels as `torch.library` custom ops (autograd, fake impls), so that
`torch.compile` traces a model using them without graph breaks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from based.ops._validate import check_kernel_dtype
from based.ops.sliding_window import triton_bwd, triton_decode, triton_fwd
from based.ops.sliding_window.cache import WindowCache


@torch.library.custom_op("based::sliding_window_fwd", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse)."""
    return triton_fwd.forward(q, k, v, window, scale)


@_forward_op.register_fake
def _(q, k, v, window, scale):
    B, Tq, H, _ = q.shape
    return q.new_empty(B, Tq, H, v.shape[-1]), q.new_empty(B * H, Tq, dtype=torch.float32)


@torch.library.custom_op("based::sliding_window_bwd", mutates_args=())
def _backward_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, window: int,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_bwd.backward(q, k, v, o, lse, do, window, scale)


@_backward_op.register_fake
def _(q, k, v, o, lse, do, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels'


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, do, d_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(q, k, v, o, lse, do, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("based::sliding_window_step", mutates_args=("cache_k", "cache_v"))
def _step_op(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor, pos_tensor: Optional[Tensor],
             pos_int: int, scale: float) -> Tensor:
    pos = pos_int if pos_tensor is None else pos_tensor
    return triton_decode.decode_step(q, k, v, cache_k, cache_v, pos, scale)


@_step_op.register_fake
def _(q, k, v, cache_k, cache_v, pos_tensor, pos_int, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1])


def _check_dtype(q: Tensor) -> None:
    check_kernel_dtype(q.dtype, "the Triton sliding-window kernels take")


def sliding_window_attention_triton(q, k, v, window: int, scale: float):
    """Same contract as `reference.sliding_window_attention_torch`, on the Triton kernels."""
    _check_dtype(q)
    return _forward_op(q, k, v, min(window, k.shape[1]), scale)[0]


def sliding_window_attention_step_triton(q, k, v, cache: WindowCache, pos, scale: float):
    """Same contract as `reference.sliding_window_attention_step_torch`, in one Triton launch."""
    _check_dtype(q)
    if isinstance(pos, Tensor):
        return _step_op(q, k, v, cache.k, cache.v, pos, 0, scale)
    return _step_op(q, k, v, cache.k, cache.v, None, pos, scale)
