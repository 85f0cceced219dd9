"""Language models: `BasedLM`, the Transformer++ baseline `Transformer`, their configs and caches."""
from based.models.based_lm import BasedLM
from based.models.config import BasedConfig, TransformerConfig
from based.models.lm import CausalLM, ModelCache
from based.models.transformer import KVCache, Transformer, attention_backend_name

__all__ = [
    "BasedConfig",
    "BasedLM",
    "TransformerConfig",
    "Transformer",
    "CausalLM",
    "ModelCache",
    "KVCache",
    "attention_backend_name",
]
