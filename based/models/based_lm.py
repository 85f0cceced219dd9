"""`BasedLM`: linear attention, sliding-window attention and BaseConv layers in one pre-norm stack."""
from __future__ import annotations

from torch import nn

from based.models.config import BasedConfig
from based.models.lm import CausalLM
from based.nn import BaseConv, LinearAttention, SlidingWindowAttention


class BasedLM(CausalLM):
    """The Based language model (`BasedConfig`); see `CausalLM` for the calling convention.

    State-dict keys are the released checkpoints': `transformer.embeddings.word_embeddings.weight`,
    `transformer.layers.{i}.{norm1,norm2,mixer,mlp}.*`, `transformer.ln_f.weight`, `lm_head.weight`.
    Decoding keeps O(1) state per layer in the sequence length: linear-attention sums, a ring buffer of
    `window` keys and values, and the last `conv_kernel_size` conv inputs. So decoding is unbounded: a cache
    made for `max_seqlen` tokens consumes any number of them (prompt chunks and single tokens alike).
    """

    config_class = BasedConfig

    def build_mixer(self, layer_idx: int, *, device=None, dtype=None) -> nn.Module:
        config, placement = self.config, dict(device=device, dtype=dtype)
        kind = config.layer_kind(layer_idx)
        if kind == "linear_attention":
            return LinearAttention(config.d_model, num_heads=config.n_heads, feature_dim=config.feature_dim,
                                   eps=config.linear_attention_eps, **placement)
        if kind == "sliding_window":
            return SlidingWindowAttention(config.d_model, num_heads=config.n_heads, window=config.window,
                                          rotary_base=config.rotary_base, **placement)
        return BaseConv(config.d_model, expand_proj=config.conv_expand, kernel_size=config.conv_kernel_size,
                        **placement)
