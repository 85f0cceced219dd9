"""The Triton kernels as `torch.library` custom ops with autograd, so `torch.compile` traces them whole.

The public state layout is converted to the kernels' raw sums (and back) outside the ops, in plain
differentiable PyTorch (`state_layout.py`), so gradients of the public initial/final states need nothing
special here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from based.ops._validate import check_kernel_dtype
from based.ops.linear_attention import triton_bwd, triton_fwd
from based.ops.linear_attention.state import LinearAttentionState
from based.ops.linear_attention.state_layout import public_from_raw, raw_from_public
from based.ops.linear_attention.triton_common import padded_feature_dim, raw_feature_count


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("based::linear_attention_fwd", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, state0: Optional[Tensor], z0: Optional[Tensor], causal: bool,
                normalize: bool, eps: float, return_state: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, den, final raw state, final raw z); den and the states are empty when not asked for."""
    o, den, final = triton_fwd.forward(q, k, v, causal, normalize, eps, state0, z0, return_state)
    state, z = final if return_state else (_empty(q), _empty(q))
    return o, den if normalize else _empty(q), state, z


@_forward_op.register_fake
def _(q, k, v, state0, z0, causal, normalize, eps, return_state):
    B, T, H, D = q.shape
    F = raw_feature_count(padded_feature_dim(D))
    f32 = dict(dtype=torch.float32)
    o = q.new_empty(B, T, H, v.shape[-1], dtype=v.dtype)
    den = q.new_empty(B * H, T, **f32) if normalize else _empty(q)
    if not return_state:
        return o, den, _empty(q), _empty(q)
    return o, den, q.new_empty(B, H, F, v.shape[-1], **f32), q.new_empty(B, H, F, **f32)


@torch.library.custom_op("based::linear_attention_bwd", mutates_args=())
def _backward_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, den: Tensor, state0: Optional[Tensor],
                 z0: Optional[Tensor], d_state: Optional[Tensor], d_z: Optional[Tensor], causal: bool,
                 normalize: bool, need_d_state0: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, d0 = triton_bwd.backward(q, k, v, o, do, den if normalize else None, state0, z0, d_state, d_z,
                                         causal, normalize, need_d_state0)
    d_state0, d_z0 = d0 if need_d_state0 else (_empty(q), _empty(q))
    return dq, dk, dv, d_state0, d_z0


@_backward_op.register_fake
def _(q, k, v, o, do, den, state0, z0, d_state, d_z, causal, normalize, need_d_state0):
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))  # contiguous, as the kernels'
    if need_d_state0:
        return (*grads, state0.new_empty(state0.shape), z0.new_empty(z0.shape))
    return (*grads, _empty(q), _empty(q))


def _setup_context(ctx, inputs, output):
    q, k, v, state0, z0, causal, normalize, eps, return_state = inputs
    o, den = output[0], output[1]
    ctx.save_for_backward(q, k, v, o, den, state0, z0)
    ctx.flags = (causal, normalize)
    ctx.has_state0 = state0 is not None


def _final_state_grads(q, v, d_state, d_z):
    """Both gradients of the final raw state, zeros for the one not used; None when neither was."""
    def used(g):
        return g is not None and g.numel() > 0

    if not (used(d_state) or used(d_z)):
        return None, None
    B, _, H, D = q.shape
    F = raw_feature_count(padded_feature_dim(D))
    zeros = dict(device=q.device, dtype=torch.float32)
    return (d_state if used(d_state) else torch.zeros(B, H, F, v.shape[-1], **zeros),
            d_z if used(d_z) else torch.zeros(B, H, F, **zeros))


def _backward(ctx, do, d_den, d_state, d_z):
    q, k, v, o, den, state0, z0 = ctx.saved_tensors
    causal, normalize = ctx.flags
    need_d_state0 = ctx.has_state0 and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    d_state, d_z = _final_state_grads(q, v, d_state, d_z)
    dq, dk, dv, d_state0, d_z0 = _backward_op(q, k, v, o, do, den, state0, z0, d_state, d_z, causal, normalize,
                                              need_d_state0)
    if not need_d_state0:
        d_state0 = d_z0 = None
    return dq, dk, dv, d_state0, d_z0, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention_triton(q, k, v, causal: bool, normalize: bool, eps: float,
                            initial_state: LinearAttentionState | None, return_state: bool):
    """Same contract as `reference.linear_attention_torch`, on the Triton kernels."""
    check_kernel_dtype(q.dtype, "the Triton linear-attention kernels take")
    d = q.shape[-1]
    dp = padded_feature_dim(d)
    state0 = z0 = None
    if initial_state is not None:
        state0, z0 = raw_from_public(initial_state.kv, initial_state.ksum, d, dp)
    o, _, state, z = _forward_op(q, k, v, state0, z0, causal, normalize, eps, return_state)
    if not return_state:
        return o
    return o, LinearAttentionState(*public_from_raw(state, z, d, dp))
