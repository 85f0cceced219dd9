"""The interface every sequence mixer of a `Block` implements (BaseConv, LinearAttention, SlidingWindowAttention,
the Transformer's CausalSelfAttention), written down once here.

A mixer's math is `mixer(x)`; everything else in its signature serves decoding:

- `cache`: the layer's decode state from `new_cache`. `forward(x, cache)` consumes any number of new tokens
  (a prompt chunk, or one token per decode step), advances the cache in place and returns what the parallel
  forward gives at those positions.
- `norm` and `residual`: `forward(x, norm=norm, residual=residual)` must equal `residual + forward(norm(x))`
  (in the residual's dtype, the blocks' fp32 stream). They exist for batch-1 decoding only, where each
  projection is one Triton matrix-vector kernel (`based.ops.linear`, `stacked_linear`,
  `linear_gated_conv1d_step`) that normalises its own input and adds the residual to its own output: a mixer
  hands `norm` to its first projection(s) and `residual` to its last (`based.nn.projection`), and the block
  then launches no norm kernel and no add. With several rows the block normalises and adds itself and passes
  neither.
- `position` (of `new_cache`): a 0-dim int64 device tensor, the absolute position of the next token, that a
  model shares among its layers and advances once per step (`CausalLM.new_cache`). A mixer whose cache tracks
  the position (rotary attention) reads that tensor and leaves advancing it to the model; a mixer whose cache
  does not need it ignores it.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from based.nn.norm import RMSNorm


class Mixer(Protocol):
    def forward(self, x: torch.Tensor, cache: Any = None, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, T, d_model]` -> `residual + mixer(norm(x))` `[B, T, d_model]` (each part optional); with
        `cache`, continue from it and advance it."""

    def new_cache(self, batch_size: int, max_seqlen: int | None = None, *, device=None, dtype=None,
                  position: torch.Tensor | None = None) -> Any:
        """An empty decode cache for `batch_size` sequences of up to `max_seqlen` tokens (on the mixer's
        device and in its dtype unless given; recurrent states in fp32)."""
