"""Mean cross-entropy of `x @ weight.T` in chunks of tokens, never holding more than one chunk's logits.

Each chunk's logits are formed in x's dtype by one matmul and turned into fp32 log-probabilities. When a gradient
is needed, the same pass also turns them into d loss / d logits (softmax minus the one-hot target, over the
number of counted tokens) and applies the two matmuls of the backward, so the logits are never recomputed: the
backward only scales the stored gradients by the incoming one. Extra memory: one chunk of fp32 logits, the
gradient of x, and an fp32 gradient of the weight. fp64 inputs are computed in fp64 throughout.
"""
from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index: int, chunk_size: int):
        counted = labels != ignore_index
        n_counted = counted.sum()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_dx else None
        acc = torch.promote_types(x.dtype, torch.float32)
        dw = torch.zeros_like(weight, dtype=acc) if need_dw else None
        total = torch.zeros((), device=x.device, dtype=acc)
        for start in range(0, x.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            x_c, mask = x[rows], counted[rows]
            target = torch.where(mask, labels[rows], 0)
            logits = (x_c @ weight.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            total = total + torch.where(mask, lse - picked, 0.0).sum()
            if need_dx or need_dw:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                grad.scatter_add_(1, target[:, None], -mask[:, None].to(grad.dtype))
                grad = grad.mul_(mask[:, None].to(acc) / n_counted).to(x.dtype)
                if need_dx:
                    dx[rows] = grad @ weight
                if need_dw:
                    dw += (grad.T @ x_c).to(acc)
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return total / n_counted

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_loss.to(dx.dtype),
                None if dw is None else (dw * grad_loss).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy_chunked(x, weight, labels, ignore_index: int, chunk_size: int | None):
    """Same contract as `reference.linear_cross_entropy_torch`, one chunk of logits at a time (`chunk_size`
    tokens; by default as many as make 2**25 logits, 128 MB in fp32)."""
    if chunk_size is None:
        chunk_size = max(1, 2**25 // weight.shape[0])
    return LinearCrossEntropy.apply(x, weight, labels, ignore_index, chunk_size)
