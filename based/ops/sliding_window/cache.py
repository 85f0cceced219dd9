"""The decode cache of sliding-window attention: a ring buffer of the last `window` keys and values.

Absolute position p lives in slot p % W (W = window), so a layer's cache is O(window) however many
tokens are generated, and a write never moves the tokens already there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from based.ops._validate import check_dims_match, check_same_device, check_shape, check_tensor


class WindowCache(NamedTuple):
    """Keys and values of the last W positions of one layer, position p in slot p % W.

    k: `[B, W, Hkv, D]`, v: `[B, W, Hkv, Dv]`. Slots not yet written hold garbage (zeros after
    `zeros`); readers only look at slots whose position is known to be written.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def zeros(cls, batch_size: int, window: int, num_kv_heads: int, head_dim: int, *,
              value_dim: int | None = None, device=None, dtype: torch.dtype = torch.float32) -> "WindowCache":
        """An empty cache for `window` positions; `value_dim` defaults to `head_dim`.

        `dtype` is the storage dtype: fp32 by default (the library keeps state in fp32); a half-precision
        cache halves the memory at the cost of rounding the keys and values written into it.
        """
        value_dim = head_dim if value_dim is None else value_dim
        return cls(
            k=torch.zeros(batch_size, window, num_kv_heads, head_dim, device=device, dtype=dtype),
            v=torch.zeros(batch_size, window, num_kv_heads, value_dim, device=device, dtype=dtype),
        )

    @property
    def window(self) -> int:
        return self.k.shape[1]


def window_cache_write(cache: WindowCache, k: torch.Tensor, v: torch.Tensor, pos) -> None:
    """Store the tokens at absolute positions `pos .. pos+T-1` into their slots, in place.

    Args:
        cache: the layer's `WindowCache`, W slots.
        k: `[B, T, Hkv, D]`, v: `[B, T, Hkv, Dv]`, any T >= 1; cast to the cache's dtype. When T > W
            only the last W tokens are kept (the earlier ones would be overwritten anyway).
        pos: absolute position of `k[:, 0]`: a Python int >= 0, or a 0-dim int64 tensor on the cache's
            device (no host sync, safe inside CUDA graphs).
    """
    check_kv(k, v, seq_dim=True)
    check_window_cache(cache, k, v)
    check_position(pos, cache, allow_tensor=True)
    write_ring(cache, k, v, pos)


def window_cache_read(cache: WindowCache, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached tokens before position `pos`, in order: positions `max(0, pos-W) .. pos-1`.

    To continue a prompt from position `pos`, concatenate these with the new chunk's keys and values
    and call `sliding_window_attention` with the chunk's queries (Tq < Tk, bottom-right aligned).

    Args:
        cache: a `WindowCache` holding (at least) the W positions before `pos`.
        pos: a Python int >= 0 (the result's length, `min(pos, W)`, depends on it).

    Returns:
        `(k, v)`: `[B, min(pos, W), Hkv, D]` and `[B, min(pos, W), Hkv, Dv]` in the cache's dtype.
    """
    check_window_cache(cache)
    check_position(pos, cache, allow_tensor=False)
    W = cache.window
    slots = torch.arange(max(0, pos - W), pos, device=cache.k.device) % W
    return cache.k.index_select(1, slots), cache.v.index_select(1, slots)


def write_ring(cache: WindowCache, k: torch.Tensor, v: torch.Tensor, pos) -> None:
    """`window_cache_write` without the checks (the decode step calls it on every token)."""
    T, W = k.shape[1], cache.window
    # Only the last W tokens survive; writing more would send several tokens to one slot, and
    # index_copy_ leaves the winner among repeated indices undefined.
    n = min(T, W)
    # `pos + arange` works for an int and for a device tensor alike, without reading pos on the host.
    slots = (pos + torch.arange(T - n, T, device=cache.k.device)) % W
    cache.k.index_copy_(1, slots, k[:, T - n:].to(cache.k.dtype))
    cache.v.index_copy_(1, slots, v[:, T - n:].to(cache.v.dtype))


def check_kv(k, v, *, seq_dim: bool) -> None:
    """k `[B, (T,) Hkv, D]` and v `[B, (T,) Hkv, Dv]` that belong together."""
    ndim = 4 if seq_dim else 3
    check_tensor("k", k, ndim=ndim)
    check_tensor("v", v, ndim=ndim)
    check_same_device(k=k, v=v)
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got k {k.dtype} and v {v.dtype}")
    check_dims_match("batch, seqlen and heads of k and v" if seq_dim else "batch and heads of k and v",
                     k=tuple(k.shape[:-1]), v=tuple(v.shape[:-1]))


def check_window_cache(cache, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
    """`cache` is a WindowCache; with k, v (with or without seqlen) its shape must fit them."""
    if not isinstance(cache, WindowCache):
        raise TypeError(f"cache must be a WindowCache, got {type(cache).__name__}")
    check_tensor("cache.k", cache.k, ndim=4)
    check_tensor("cache.v", cache.v, ndim=4)
    B, W, Hkv, D = cache.k.shape
    check_shape("cache.v", cache.v, (B, W, Hkv, cache.v.shape[-1]))
    if k is None:
        return
    check_same_device(k=k, **{"cache.k": cache.k, "cache.v": cache.v})
    check_shape("cache.k", cache.k, (k.shape[0], W, k.shape[-2], k.shape[-1]))
    check_shape("cache.v", cache.v, (v.shape[0], W, v.shape[-2], v.shape[-1]))


def check_position(pos, cache: WindowCache, *, allow_tensor: bool) -> None:
    """`pos` is an int >= 0, or (where `allow_tensor`) a 0-dim int64 tensor on the cache's device.

    A tensor's value is not checked: reading it would sync with the device.
    """
    if isinstance(pos, torch.Tensor):
        if not allow_tensor:
            raise TypeError("pos must be a Python int here (the result's length depends on it), got a tensor")
        if pos.dim() != 0 or pos.dtype != torch.int64:
            raise TypeError(f"pos must be a 0-dim int64 tensor, got shape {tuple(pos.shape)} and dtype {pos.dtype}")
        check_same_device(pos=pos, **{"cache.k": cache.k})
        return
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise TypeError(f"pos must be an int or a 0-dim int64 tensor, got {type(pos).__name__}")
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
