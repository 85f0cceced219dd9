"""The Based sliding-window mixer: softmax attention over the last `window` tokens, with RoPE."""
from __future__ import annotations

from typing import NamedTuple

import torch

from based.nn.attention import RotaryAttention
from based.ops import WindowCache, sliding_window_attention, sliding_window_attention_step, window_cache_read
from based.ops import window_cache_write


class SlidingWindowCache(NamedTuple):
    """Decode state of one sliding-window layer.

    window:   ring buffer of the last `window` keys (after RoPE) and values.
    position: 0-dim int64 tensor on the layer's device, the absolute position of the next token. It
              lives on the device and is advanced in place, so a captured decode step replays correctly.
    advance:  whether the layer advances `position` after each call; False when the cache reads a position
              its owner advances (`new_cache(..., position=)`, see `based.nn.mixer`).
    """

    window: WindowCache
    position: torch.Tensor
    advance: bool = True

    @property
    def batch_size(self) -> int:
        return self.window.k.shape[0]


class SlidingWindowAttention(RotaryAttention):
    """Causal softmax attention where each token sees itself and the `window - 1` tokens before it.

    A `RotaryAttention` (projections, RoPE base 10000 by default or none with `rotary_base=None`, parameter
    names). The released configs' flash-attn `window_size` w is `window = w // 2 + 1` here (129 for w = 256).

    Decoding: `layer.new_cache(batch_size)` holds `window` positions whatever the sequence length, so decoding
    may run on for any number of tokens.
    """

    cache_type = SlidingWindowCache

    def __init__(self, d_model: int, *, num_heads: int = 16, window: int = 129,
                 rotary_base: float | None = 10000.0, device=None, dtype=None):
        super().__init__(d_model, num_heads=num_heads, rotary_base=rotary_base, device=device, dtype=dtype)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window

    def cache_tensors(self, batch_size: int, max_seqlen: int | None, device, dtype) -> tuple[WindowCache]:
        """A ring of `window` positions; `max_seqlen` does not change its size."""
        return (WindowCache.zeros(batch_size, self.window, self.num_heads, self.head_dim, device=device,
                                  dtype=dtype),)

    def attend(self, q, k, v):
        return sliding_window_attention(q, k, v, window=self.window)

    def attend_cached(self, q, k, v, cache: SlidingWindowCache):
        if q.shape[1] == 1:
            # The decode step: reads the position on the device only, so it can be graph-captured.
            return sliding_window_attention_step(q[:, 0], k[:, 0], v[:, 0], cache.window, cache.position)[:, None]
        # A prompt chunk: attend over the cached tail of the window plus the chunk itself.
        # The tail's length depends on the position, so it is read on the host here.
        start = int(cache.position)
        past_k, past_v = window_cache_read(cache.window, start)
        keys, values = torch.cat([past_k.to(k.dtype), k], 1), torch.cat([past_v.to(v.dtype), v], 1)
        o = sliding_window_attention(q, keys, values, window=self.window)
        window_cache_write(cache.window, k, v, start)
        return o
