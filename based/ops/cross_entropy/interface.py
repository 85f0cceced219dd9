"""Public entry point of the LM-head cross-entropy: argument checks, then the chunked or reference path."""
from __future__ import annotations

import torch

from based.ops._backend import autocast_cast
from based.ops._validate import check_positive_int, check_same_device, check_shape, check_tensor
from based.ops.cross_entropy.chunked import linear_cross_entropy_chunked
from based.ops.cross_entropy.reference import linear_cross_entropy_torch

_IMPLEMENTATIONS = {"auto": linear_cross_entropy_chunked, "torch": linear_cross_entropy_torch}


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of the logits `x @ weight.T` against `labels`, over the labels that are not
    `ignore_index`: `F.cross_entropy((x @ weight.T).float(), labels, ignore_index=ignore_index)` (fp64 logits for
    fp64 inputs).

    Args:
        x: `[N, d]` (an LM head's inputs); fp16, bf16, fp32 (fp64 on the torch backend).
        weight: `[V, d]` in x's dtype (the LM head's weight). Under `torch.autocast` both are cast to its dtype
            first.
        labels: `[N]` int64, each in `[0, V)` or `ignore_index`.
        chunk_size: tokens per chunk of logits on the "auto" path (default: 2**25 logits' worth).
        backend: "auto" (chunks of tokens: at most one chunk of fp32 logits exists, and the gradients are formed
            in the same pass; plain PyTorch, any device) or "torch" (the reference: all N x V logits in fp32).

    Returns:
        The loss, a 0-dim fp32 tensor (fp64 for fp64 inputs; NaN when every label is ignored, as PyTorch's). Differentiable in x and
        weight. Checking the labels' range costs one host read (skipped under torch.compile).
    """
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {tuple(_IMPLEMENTATIONS)}, got {backend!r}")
    if isinstance(x, torch.Tensor):  # the LM head's matrix product in the autocast dtype, as `nn.Linear` has it
        x, weight = autocast_cast(x.device, x, weight)
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_shape("weight", weight, (weight.shape[0], x.shape[1]))
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    check_shape("labels", labels, (x.shape[0],))
    check_same_device(x=x, weight=weight, labels=labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    if not torch.compiler.is_compiling():
        outside = ((labels < 0) | (labels >= weight.shape[0])) & (labels != ignore_index)
        if outside.any():
            raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index ({ignore_index}), "
                             f"got {labels[outside][0].item()}")
    return _IMPLEMENTATIONS[backend](x, weight, labels, ignore_index, chunk_size)
