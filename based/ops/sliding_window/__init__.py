"""Sliding-window softmax attention: parallel op, decode step, ring-buffer cache.

Files: `reference.py` (plain PyTorch, blocked, O(T * window) memory), `cache.py` (the ring buffer and
its read/write), `interface.py` (checks + dispatch).
"""
from based.ops.sliding_window.cache import WindowCache, window_cache_read, window_cache_write
from based.ops.sliding_window.interface import sliding_window_attention, sliding_window_attention_step

__all__ = [
    "sliding_window_attention",
    "sliding_window_attention_step",
    "WindowCache",
    "window_cache_write",
    "window_cache_read",
]
