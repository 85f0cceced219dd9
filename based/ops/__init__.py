"""Ops of Based models. Each takes `backend="auto" | "torch" | "triton" | "cuda"`."""
from based.ops.feature_map import feature_dim_of, taylor_feature_map
from based.ops.linear_attention import LinearAttentionState, linear_attention, linear_attention_step

__all__ = [
    "taylor_feature_map",
    "feature_dim_of",
    "linear_attention",
    "linear_attention_step",
    "LinearAttentionState",
]
