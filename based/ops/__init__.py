"""Ops of Based models. Each takes `backend="auto" | "torch" | "triton" | "cuda"`."""
from based.ops.cross_entropy import linear_cross_entropy
from based.ops.feature_map import feature_dim_of, taylor_feature_map
from based.ops.linear import linear, stacked_linear
from based.ops.linear_attention import LinearAttentionState, linear_attention, linear_attention_step
from based.ops.rms_norm import rms_norm
from based.ops.rotary import apply_rotary
from based.ops.short_conv import (causal_conv1d, causal_conv1d_step, gated_conv1d, gated_conv1d_step,
                                  linear_gated_conv1d_step)
from based.ops.sliding_window import (
    WindowCache,
    sliding_window_attention,
    sliding_window_attention_step,
    window_cache_read,
    window_cache_write,
)

__all__ = [
    "taylor_feature_map",
    "feature_dim_of",
    "linear_attention",
    "linear_attention_step",
    "LinearAttentionState",
    "sliding_window_attention",
    "sliding_window_attention_step",
    "WindowCache",
    "window_cache_write",
    "window_cache_read",
    "linear",
    "stacked_linear",
    "rms_norm",
    "apply_rotary",
    "causal_conv1d",
    "causal_conv1d_step",
    "gated_conv1d",
    "gated_conv1d_step",
    "linear_gated_conv1d_step",
    "linear_cross_entropy",
]
