"""Checkpoint I/O: the released Based format and the format `save_pretrained` writes.

A checkpoint is a local directory with `config.json` and the weights in `*.safetensors` or
`pytorch_model.bin`. Nothing is ever fetched from a hub.

The released Based checkpoints hold a GPT-2-style `config.json` (`n_embd`, `n_layer`, `n_inner`, ...,
with the mixers as `_target_` dicts) and state-dict keys prefixed with `model.`, next to training
`metrics` entries. `load_pretrained` reads that, and the `config.json` that `BasedConfig.to_dict`
writes (told apart by `n_embd`).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from based.models.config import BasedConfig, _is_finite_number

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"


def save_pretrained(model, path, *, safe_serialization: bool = True) -> None:
    """Write `model`'s config and weights into the directory `path` (created if needed).

    Weights go to `model.safetensors` (`pytorch_model.bin` with `safe_serialization=False`). A tied
    `lm_head.weight` is not written: it is the embedding matrix, which `load_pretrained` ties back.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    if safe_serialization:
        _safetensors().save_file(state, str(path / SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state, path / PYTORCH_NAME)


def load_pretrained(model_class, path, *, device=None, dtype: torch.dtype | None = None):
    """Build `model_class` (`BasedLM` or `Transformer`) from the checkpoint directory `path`.

    The model is created on the meta device and materialised once on `device` (CPU by default) in
    `dtype` (float32 by default), so the weights are never randomly initialised first. Keys: a leading
    `model.` is dropped, as are keys containing `metrics` and rotary `inv_freq` buffers (derived from
    the config). Any other missing, unexpected or mis-shaped key raises ValueError.
    Returns the model in eval mode.

    Raises FileNotFoundError when nothing exists at `path` or a needed file is missing,
    NotADirectoryError when `path` is a file (such as the checkpoint's own config.json) rather than
    the directory, and ValueError naming the file when config.json or a weights file cannot be read
    or does not describe a `model_class`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not path.is_dir():
        what = "a file" if path.is_file() else "not a directory"
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is {what}: pass the checkpoint directory "
                                 f"(the one holding {CONFIG_NAME} and the weights)")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r}")
    config = read_config(model_class.config_class, config_file)
    state = clean_state_dict(read_weights(path))

    with torch.device("meta"):
        model = model_class(config, dtype=dtype)
    model.to_empty(device=torch.device("cpu") if device is None else device)
    model.tie_weights()  # to_empty gives each parameter its own storage
    load_weights(model, state)
    return model.eval()


def read_config(config_class, config_file: Path):
    """A `config_class` instance from the config.json file `config_file` (released GPT-2-style or our own).

    Raises ValueError naming `config_file` when it is not valid JSON, holds something other than a
    JSON object, misses a field or gives a field a value the config rejects.
    """
    where = f"{CONFIG_NAME} at {str(config_file)!r}"
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a JSON object, got {_json_kind(raw)}")
    try:
        if "n_embd" in raw:
            if config_class is not BasedConfig:
                raise ValueError(f"{config_class.__name__} cannot read a released Based (GPT-2-style) config")
            return config_from_released(raw)
        return config_class.from_dict(raw)
    except KeyError as err:
        raise ValueError(f"{where}: missing field {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        # TypeError: a field of the wrong JSON type reaching arithmetic in config_from_released.
        raise ValueError(f"{where}: {err}") from err


def _json_kind(value: Any) -> str:
    """How JSON spells the kind of a parsed value."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def config_from_released(raw: dict[str, Any]) -> BasedConfig:
    """Map the released GPT-2-style config (flash-attn GPT fields + `_target_` mixer dicts) to a BasedConfig."""
    d_model = raw["n_embd"]
    base_conv = _mixer_dict(raw, "mixer", "BaseConv")
    linear_layers = _layer_list(raw, "alt_mixer_layers")
    window_layers = _layer_list(raw, "alt_mixer_2_layers")
    linear = _mixer_dict(raw, "alt_mixer", "LinearAttention") if linear_layers else {}
    sliding = _mixer_dict(raw, "alt_mixer_2", "SlidingAttention") if window_layers else {}

    _require(raw.get("rms_norm", False) is True, "rms_norm must be true (LayerNorm models are not supported)")
    _require(raw.get("activation_function") == "swiglu",
             f"activation_function must be 'swiglu', got {raw.get('activation_function')!r}")
    _require(base_conv.get("use_bias", True) is True, "mixer.use_bias must be true (BaseConv projections have biases)")
    _require(linear.get("feature_name", "taylor_exp") == "taylor_exp",
             f"alt_mixer.feature_name must be 'taylor_exp', got {linear.get('feature_name')!r}")
    _require(sliding.get("causal", True) is True, "alt_mixer_2.causal must be true")
    if window_layers:
        fraction = raw.get("rotary_emb_fraction", 1.0)
        _require(_is_finite_number(fraction) and fraction == 1,
                 f"rotary_emb_fraction must be 1.0 (rotary on the full head dim), got {fraction!r}")
        _require("window_size" in sliding, "alt_mixer_2 needs a window_size")
        window_size = sliding["window_size"]
        _require(isinstance(window_size, int) and not isinstance(window_size, bool) and window_size >= 0,
                 f"alt_mixer_2.window_size must be an int >= 0, got {window_size!r}")
    heads = {linear.get("num_heads", raw.get("n_head")), sliding.get("num_heads", raw.get("n_head"))} - {None}
    _require(len(heads) == 1, f"linear and sliding-window attention must agree on num_heads, got {sorted(heads)}")
    num_heads = heads.pop()
    _require(linear.get("num_key_value_heads", num_heads) == num_heads,
             "alt_mixer.num_key_value_heads must equal num_heads")

    optional = {}
    if window_layers:
        optional["window"] = window_size // 2 + 1  # flash-attn window_size=(w//2, 0)
    if "eps" in linear:
        optional["linear_attention_eps"] = linear["eps"]
    rotary_base = raw.get("rotary_emb_base", 10000.0)
    _require(_is_finite_number(rotary_base), f"rotary_emb_base must be a number, got {rotary_base!r}")
    return BasedConfig(
        d_model=d_model,
        n_layers=raw["n_layer"],
        n_heads=num_heads,
        vocab_size=raw["vocab_size"],
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 1),
        # flash-attn's GPT: fc1 is [2 * n_inner, n_embd] for swiglu, n_inner defaulting to 4 * n_embd.
        mlp_hidden_dim=raw.get("n_inner") or 4 * d_model,
        linear_attention_layers=tuple(linear_layers),
        sliding_window_layers=tuple(window_layers),
        feature_dim=linear.get("feature_dim", 16),
        rotary_base=float(rotary_base),
        conv_expand=base_conv["expand_proj"],
        # The released BaseConv ignores its misspelled `kernel_sizes` and always uses 3 taps.
        conv_kernel_size=3,
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=raw.get("tie_word_embeddings", True),
        **optional,
    )


def _mixer_dict(raw: dict[str, Any], key: str, class_name: str) -> dict[str, Any]:
    mixer = raw.get(key)
    if not isinstance(mixer, dict) or not str(mixer.get("_target_", "")).endswith(class_name):
        raise ValueError(f"{key} must be a dict whose _target_ ends in {class_name!r}, got {mixer!r}")
    if class_name == "BaseConv" and "expand_proj" not in mixer:
        raise ValueError(f"{key} needs expand_proj")
    return mixer


def _layer_list(raw: dict[str, Any], key: str) -> list:
    layers = raw.get(key) or []
    if not isinstance(layers, list):
        raise ValueError(f"{key} must be a list of layer indices, got {layers!r}")
    return layers


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"unsupported setting: {message}")


def read_weights(path: Path) -> dict[str, Any]:
    """All tensors of `*.safetensors` in `path` (merged), else of `pytorch_model.bin`.

    Raises ValueError naming the file when a weights file cannot be parsed (truncated or corrupt, or a
    pickle that `torch.load(weights_only=True)` refuses), with the reader's own error chained.
    """
    safetensors_files = sorted(path.glob("*.safetensors"))
    if safetensors_files:
        safetensors_torch = _safetensors()
        from safetensors import SafetensorError

        state = {}
        for file in safetensors_files:
            try:
                state.update(safetensors_torch.load_file(str(file)))
            except SafetensorError as err:
                raise ValueError(f"could not read the safetensors file {str(file)!r}: {err}") from err
        return state
    file = path / PYTORCH_NAME
    if file.is_file():
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except (PermissionError, IsADirectoryError):
            raise  # already name the file, and no content was read
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            # A truncated zip reads as RuntimeError (no central directory) or OSError (a seek past
            # the end), a truncated legacy pickle as EOFError or UnpicklingError.
            raise ValueError(f"could not read the PyTorch checkpoint {str(file)!r}: {err}") from err
    raise FileNotFoundError(f"no *.safetensors or {PYTORCH_NAME} in {str(path)!r}")


def clean_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop `metrics` entries and derived rotary buffers, strip a leading `model.` prefix."""
    cleaned = {}
    for key, value in state.items():
        if "metrics" in key or key.endswith("inv_freq"):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        cleaned[key.removeprefix("model.")] = value
    return cleaned


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`'s parameters; every key must match in name and shape."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        # The head is the embedding matrix; a checkpoint may or may not store it twice.
        expected.pop("lm_head.weight")
        state = {key: value for key, value in state.items() if key != "lm_head.weight"}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}({model.config}):"
                         f"{_key_list(' missing keys', missing)}{_key_list(' unexpected keys', unexpected)}")
    wrong_shapes = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                    for key, value in state.items() if value.shape != expected[key].shape]
    if wrong_shapes:
        raise ValueError("checkpoint shapes do not match the config: " + "; ".join(wrong_shapes))
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)


def _key_list(what: str, keys: list[str], shown: int = 10) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{what} ({len(keys)}): {', '.join(keys[:shown])}{more}"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("reading or writing *.safetensors needs the safetensors package "
                          "(pip install safetensors), or use pytorch_model.bin") from err
    return safetensors.torch
