"""Model configurations: `BasedConfig` and the Transformer++ baseline's `TransformerConfig`.

Both are dataclasses with presets: `BasedConfig.from_preset("based-360m", n_layers=4)` starts from a
preset and overrides fields; `dataclasses.replace(config, ...)` works too (and re-validates).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar


class _PresetConfig:
    """What both configs share: presets, the padded vocabulary, dict round-trips, checks."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    MODEL_TYPE: ClassVar[str] = ""

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A config with the architecture of the preset `name`, `overrides` replacing some of its fields.

        A preset is only a set of field values (the released architectures, or the baselines matched to
        them in size): no weights come with it and nothing is downloaded; load weights with
        `from_pretrained`. `BasedConfig` has "based-360m" and "based-1.3b", `TransformerConfig`
        "transformer-360m" and "transformer-1.3b" (the keys of `PRESETS`).

        Args:
            name: the preset's name.
            **overrides: field values that replace the preset's, e.g. `n_layers=4` for a small test model.

        Returns:
            A new, validated config of this class.

        Raises:
            ValueError: `name` is not one of this class's presets (the message lists them), or a field
                value is invalid (the message names the field).
            TypeError: an override names no field of this class.
        """
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; available: {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def padded_vocab_size(self) -> int:
        """The embedding rows: `vocab_size` rounded up to `pad_vocab_size_multiple` (50257 -> 50264)."""
        multiple = self.pad_vocab_size_multiple
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus `model_type`, the form `save_pretrained` writes."""
        return {"model_type": self.MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]):
        """Inverse of `to_dict`."""
        fields = dict(fields)
        model_type = fields.pop("model_type", cls.MODEL_TYPE)
        if model_type != cls.MODEL_TYPE:
            raise ValueError(f"{cls.__name__} cannot read a config of model_type {model_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**fields)

    def _check_common(self) -> None:
        _check_positive_ints(self, "d_model", "n_layers", "n_heads", "vocab_size", "pad_vocab_size_multiple")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.mlp_hidden_dim is not None and not _is_int(self.mlp_hidden_dim, minimum=1):
            raise ValueError(f"mlp_hidden_dim must be an int >= 1 or None, got {self.mlp_hidden_dim!r}")
        for name in ("norm_eps", "rotary_base"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        # A JSON string such as "false" would be truthy: only a real bool is taken.
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")


def _is_int(value: Any, *, minimum: int) -> bool:
    """An int (not a bool, which JSON's true/false would give) that is at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither inf nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_ints(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_int(value, minimum=1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class BasedConfig(_PresetConfig):
    """A Based language model. The defaults are the `based-360m` preset.

    Layers listed in `linear_attention_layers` (0-based) are Taylor linear attention, those in
    `sliding_window_layers` sliding-window softmax attention, all others BaseConv. Every layer is a
    pre-norm block with a SwiGLU MLP; embeddings are tied to the LM head.

    `window` counts the tokens a sliding-window query sees, itself included: the released configs'
    `window_size` w is `w // 2 + 1` here. `mlp_hidden_dim=None` means `2 * d_model`.
    """

    d_model: int = 1024
    n_layers: int = 27
    n_heads: int = 16
    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    mlp_hidden_dim: int | None = None
    linear_attention_layers: tuple[int, ...] = (1, 6, 11, 16, 21)
    sliding_window_layers: tuple[int, ...] = (2, 7, 12, 17, 22)
    feature_dim: int = 16
    linear_attention_eps: float = 1e-12
    window: int = 129
    rotary_base: float = 10000.0
    conv_expand: int = 4
    conv_kernel_size: int = 3
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    MODEL_TYPE: ClassVar[str] = "based"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "based-360m": dict(d_model=1024, n_layers=27, linear_attention_layers=(1, 6, 11, 16, 21),
                           sliding_window_layers=(2, 7, 12, 17, 22)),
        "based-1.3b": dict(d_model=1792, n_layers=36, linear_attention_layers=(1, 6, 11, 16, 21, 27, 33),
                           sliding_window_layers=(2, 7, 12, 17, 22, 28, 34)),
    }

    def __post_init__(self):
        for name in ("linear_attention_layers", "sliding_window_layers"):
            layers = getattr(self, name)
            if isinstance(layers, (str, bytes, dict)) or not hasattr(layers, "__iter__"):
                raise ValueError(f"{name} must be a list of layer indices, got {layers!r}")
            # JSON gives lists; tuples keep the config hashable and comparable.
            setattr(self, name, tuple(layers))
        self._check_common()
        _check_positive_ints(self, "feature_dim", "window", "conv_expand", "conv_kernel_size")
        if not _is_finite_number(self.linear_attention_eps) or self.linear_attention_eps < 0:
            raise ValueError(f"linear_attention_eps must be a finite number >= 0, got {self.linear_attention_eps!r}")
        if self.sliding_window_layers and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got d_model {self.d_model} / "
                             f"n_heads {self.n_heads} = {self.head_dim}")
        for name in ("linear_attention_layers", "sliding_window_layers"):
            layers = getattr(self, name)
            if (not all(_is_int(i, minimum=0) for i in layers) or len(set(layers)) != len(layers)
                    or any(i >= self.n_layers for i in layers)):
                raise ValueError(f"{name} must hold distinct layer indices in [0, {self.n_layers}), got {layers}")
        both = sorted(set(self.linear_attention_layers) & set(self.sliding_window_layers))
        if both:
            raise ValueError(f"layers {both} are in both linear_attention_layers and sliding_window_layers")

    @property
    def mlp_hidden(self) -> int:
        return 2 * self.d_model if self.mlp_hidden_dim is None else self.mlp_hidden_dim

    def layer_kind(self, layer_idx: int) -> str:
        """"linear_attention", "sliding_window" or "base_conv"."""
        if layer_idx in self.linear_attention_layers:
            return "linear_attention"
        if layer_idx in self.sliding_window_layers:
            return "sliding_window"
        return "base_conv"


@dataclass
class TransformerConfig(_PresetConfig):
    """The Transformer++ baseline: RoPE, SwiGLU MLP, RMSNorm, tied embeddings; defaults `transformer-360m`.

    `mlp_hidden_dim=None` means `8/3 * d_model` rounded up to a multiple of 256 (2816 for d_model 1024,
    5632 for 2048), the usual SwiGLU width. The presets match the Based presets' parameter counts to
    within 5%.
    """

    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    mlp_hidden_dim: int | None = None
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    MODEL_TYPE: ClassVar[str] = "transformer++"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "transformer-360m": dict(d_model=1024, n_layers=24, n_heads=16),
        "transformer-1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
    }

    def __post_init__(self):
        self._check_common()
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got d_model {self.d_model} / "
                             f"n_heads {self.n_heads} = {self.head_dim}")

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        return 256 * math.ceil(8 * self.d_model / 3 / 256)
