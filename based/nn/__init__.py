"""Drop-in layers of Based models.

Each mixer has a parallel `forward(x)` over `[B, T, d_model]` and a cache path `forward(x, cache)`:
`cache = layer.new_cache(batch_size, max_seqlen)` preallocates the layer's decode state, and each call
consumes any number of new tokens (a prompt chunk, or one token per decode step), advancing the cache in
place and returning what the parallel forward gives at those positions. The whole interface, including the
`norm`/`residual` arguments batch-1 decoding fuses through, is `Mixer` (`based/nn/mixer.py`).
"""
from based.nn.attention import RotaryAttention
from based.nn.base_conv import BaseConv, ShortConvolution
from based.nn.block import Block
from based.nn.linear_attention import LinearAttention
from based.nn.mixer import Mixer
from based.nn.mlp import GatedMlp
from based.nn.norm import RMSNorm
from based.nn.rotary import apply_rotary
from based.nn.sliding_window import SlidingWindowAttention, SlidingWindowCache

__all__ = [
    "LinearAttention",
    "SlidingWindowAttention",
    "SlidingWindowCache",
    "RotaryAttention",
    "Mixer",
    "BaseConv",
    "ShortConvolution",
    "GatedMlp",
    "RMSNorm",
    "Block",
    "apply_rotary",
]
