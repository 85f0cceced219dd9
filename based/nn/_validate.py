"""Checks shared by the layers' forward passes (the ops check their own arguments)."""
from __future__ import annotations

import torch


def check_hidden_states(x, d_model: int) -> None:
    """`x` must be a `[B, T, d_model]` floating tensor with T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
        raise ValueError(f"x must have shape [batch, seqlen >= 1, {d_model}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def check_cache_type(cache, expected: type, layer: str) -> None:
    if not isinstance(cache, expected):
        raise TypeError(f"{layer} needs a {expected.__name__} cache (from its new_cache), got {type(cache).__name__}")


def check_cache_batch(cache_batch: int, x: torch.Tensor) -> None:
    if cache_batch != x.shape[0]:
        raise ValueError(f"cache holds batch size {cache_batch} but x has shape {tuple(x.shape)}")


def parameter_placement(module: torch.nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    """`device`/`dtype` if given, else those of the module's first parameter."""
    weight = next(module.parameters())
    return (weight.device if device is None else torch.device(device),
            weight.dtype if dtype is None else dtype)
