"""Drop-in layers of Based models.

Each mixer has a parallel `forward(x)` over `[B, T, d_model]` and a cache path `forward(x, cache)`:
`cache = layer.new_cache(batch_size, max_seqlen)` preallocates the layer's decode state, and each call
consumes any number of new tokens (a prompt chunk, or one token per decode step), advancing the cache in
place and returning what the parallel forward gives at those positions.
"""
from based.nn.base_conv import BaseConv, ShortConvolution
from based.nn.block import Block
from based.nn.linear_attention import LinearAttention
from based.nn.mlp import GatedMlp
from based.nn.norm import RMSNorm
from based.nn.rotary import apply_rotary
from based.nn.sliding_window import SlidingWindowAttention, SlidingWindowCache

__all__ = [
    "LinearAttention",
    "SlidingWindowAttention",
    "SlidingWindowCache",
    "BaseConv",
    "ShortConvolution",
    "GatedMlp",
    "RMSNorm",
    "Block",
    "apply_rotary",
]
