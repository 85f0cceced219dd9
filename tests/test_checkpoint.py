"""Checkpoints: the released Based format (GPT-2-style config.json, `model.`-prefixed weights with
`metrics` entries) and save_pretrained / from_pretrained round trips."""
import dataclasses
import json
import re

import pytest
import torch

from based.models import BasedConfig, BasedLM, Transformer, TransformerConfig

VOCAB = 100
SAVED_CONFIG = BasedConfig(d_model=64, n_layers=6, n_heads=4, vocab_size=VOCAB, mlp_hidden_dim=128,
                           linear_attention_layers=(1, 4), sliding_window_layers=(2, 5), feature_dim=8, window=5)
RELEASED_CONFIG = {
    "_name_or_path": "based-tiny", "architectures": ["GPTLMHeadModel"], "model_type": "gpt2",
    "n_embd": 64, "n_layer": 6, "n_head": 4, "n_inner": 128, "n_positions": 0,
    "vocab_size": VOCAB, "pad_vocab_size_multiple": 8, "rms_norm": True, "residual_in_fp32": True,
    "activation_function": "swiglu", "rotary_emb_fraction": 1, "layer_norm_epsilon": 1e-5,
    "fused_dropout_add_ln": True, "use_flash_attn": True, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
    "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "expand_proj": 4, "kernel_sizes": 3,
              "l_max": 2048, "use_bias": True},
    "alt_mixer": {"_target_": "based.models.mixers.linear_attention.LinearAttention", "feature_dim": 8,
                  "feature_name": "taylor_exp", "num_heads": 4, "num_key_value_heads": 4, "l_max": 2048,
                  "train_view": "linear"},
    "alt_mixer_layers": [1, 4],
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": 8,
                    "num_heads": 4, "causal": True},
    "alt_mixer_2_layers": [2, 5],
}


def random_model(model_class=BasedLM, config=SAVED_CONFIG):
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # norms and biases too, so a weight loaded into the wrong slot shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def write_released_checkpoint(path, model, *, config=RELEASED_CONFIG, safetensors=False, drop=(), extra=None):
    """The released layout: `model.`-prefixed keys (lm_head included), a metrics entry, a rotary buffer."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items() if k not in drop}
    state["metrics.train/loss"] = torch.tensor(2.5)
    state["model.transformer.layers.2.mixer.rotary_emb.inv_freq"] = torch.ones(8)
    state.update(extra or {})
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")


def assert_same_logits(loaded, model):
    input_ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids), model(input_ids))


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_loads_the_released_format(tmp_path, use_safetensors):
    model = random_model()
    write_released_checkpoint(tmp_path, model, safetensors=use_safetensors)
    loaded = BasedLM.from_pretrained(tmp_path)
    assert loaded.config == SAVED_CONFIG
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.embeddings.word_embeddings.weight
    assert_same_logits(loaded, model)


def test_released_checkpoint_without_lm_head_and_in_bfloat16(tmp_path):
    model = random_model()
    write_released_checkpoint(tmp_path, model, drop=("lm_head.weight",))
    loaded = BasedLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("safe_serialization", [False, True])
@pytest.mark.parametrize("model_class, config", [
    (BasedLM, SAVED_CONFIG),
    (Transformer, TransformerConfig(d_model=64, n_layers=3, n_heads=4, vocab_size=VOCAB)),
])
def test_save_pretrained_round_trip(tmp_path, model_class, config, safe_serialization):
    model = random_model(model_class, config)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    assert (tmp_path / ("model.safetensors" if safe_serialization else "pytorch_model.bin")).is_file()
    loaded = model_class.from_pretrained(tmp_path)
    assert loaded.config == config
    assert loaded.lm_head.weight is loaded.transformer.embeddings.word_embeddings.weight
    assert_same_logits(loaded, model)


def test_untied_round_trip(tmp_path):
    model = random_model(BasedLM, dataclasses.replace(SAVED_CONFIG, tie_embeddings=False))
    model.save_pretrained(tmp_path, safe_serialization=False)
    loaded = BasedLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.transformer.embeddings.word_embeddings.weight
    assert_same_logits(loaded, model)


def test_key_mismatches_raise(tmp_path):
    model = random_model()
    write_released_checkpoint(tmp_path / "missing", model, drop=("transformer.layers.3.mixer.in_proj.bias",))
    with pytest.raises(ValueError, match=r"missing keys \(1\): transformer.layers.3.mixer.in_proj.bias"):
        BasedLM.from_pretrained(tmp_path / "missing")
    write_released_checkpoint(tmp_path / "unexpected", model, extra={"model.transformer.extra.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): transformer.extra.weight"):
        BasedLM.from_pretrained(tmp_path / "unexpected")
    write_released_checkpoint(tmp_path / "shapes", model, config={**RELEASED_CONFIG, "n_inner": 96})
    with pytest.raises(ValueError, match=r"mlp.fc1.weight: checkpoint \(256, 64\), model \(192, 64\)"):
        BasedLM.from_pretrained(tmp_path / "shapes")


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu_new"}, "swiglu"),
    ({"rms_norm": False}, "rms_norm"),
    ({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction"),
    ({"alt_mixer": {**RELEASED_CONFIG["alt_mixer"], "_target_": "based.models.mixers.mamba.Mamba"}}, "LinearAttention"),
    ({"alt_mixer": {**RELEASED_CONFIG["alt_mixer"], "feature_name": "performer"}}, "taylor_exp"),
    ({"alt_mixer_2": {**RELEASED_CONFIG["alt_mixer_2"], "num_heads": 8}}, "num_heads"),
    ({"mixer": {**RELEASED_CONFIG["mixer"], "use_bias": False}}, "use_bias"),
])
def test_unsupported_released_configs_raise(tmp_path, change, message):
    write_released_checkpoint(tmp_path, random_model(), config={**RELEASED_CONFIG, **change})
    with pytest.raises(ValueError, match=message):
        BasedLM.from_pretrained(tmp_path)


def test_missing_files_and_wrong_model_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BasedLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        BasedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        BasedLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Transformer"):
        Transformer.from_pretrained(tmp_path)


def saved_checkpoint(path, *, safe_serialization=False):
    """A small checkpoint written by save_pretrained; returns the model."""
    model = random_model()
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return model


def path_pattern(file):
    return re.escape(repr(str(file)))


@pytest.mark.parametrize("text, message", [
    ('{"d_model": 64, "n_lay', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('"based"', "must hold a JSON object, got a string"),
    ("null", "must hold a JSON object, got null"),
])
def test_unreadable_config_json_raises_value_error_naming_the_file(tmp_path, text, message):
    saved_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"config.json at {path_pattern(tmp_path / 'config.json')} {message}"):
        BasedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"d_model": "64"}, "d_model must be an int >= 1, got '64'"),
    ({"norm_eps": "1e-5"}, "norm_eps must be a finite number > 0, got '1e-5'"),
    ({"rotary_base": None}, "rotary_base must be a finite number > 0, got None"),
    ({"linear_attention_eps": "tiny"}, "linear_attention_eps must be a finite number >= 0"),
    ({"mlp_hidden_dim": "128"}, "mlp_hidden_dim must be an int >= 1 or None"),
    ({"linear_attention_layers": 1}, "linear_attention_layers must be a list of layer indices, got 1"),
    ({"sliding_window_layers": ["2", "5"]}, "sliding_window_layers must hold distinct layer indices"),
    # A string is truthy: taken as it stands, "false" would tie the head it says is untied.
    ({"tie_embeddings": "false"}, "tie_embeddings must be a bool, got 'false'"),
    ({"n_heads": 5}, r"d_model \(64\) must be a multiple of n_heads \(5\)"),
    ({"model_type": "gpt2"}, "BasedConfig cannot read a config of model_type 'gpt2'"),
])
def test_mistyped_saved_config_raises_value_error_naming_the_file(tmp_path, change, message):
    saved_checkpoint(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=f"config.json at {path_pattern(config_file)}: {message}"):
        BasedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({k: v for k, v in RELEASED_CONFIG.items() if k != "n_layer"}, "missing field 'n_layer'"),
    ({k: v for k, v in RELEASED_CONFIG.items() if k != "vocab_size"}, "missing field 'vocab_size'"),
    ({**RELEASED_CONFIG, "alt_mixer_layers": 1}, "alt_mixer_layers must be a list of layer indices, got 1"),
    ({**RELEASED_CONFIG, "rotary_emb_fraction": None}, "rotary_emb_fraction must be 1.0"),
    ({**RELEASED_CONFIG, "rotary_emb_base": "10000"}, "rotary_emb_base must be a number"),
    ({**RELEASED_CONFIG, "alt_mixer_2": {**RELEASED_CONFIG["alt_mixer_2"], "window_size": "8"}},
     "alt_mixer_2.window_size must be an int"),
    ({**RELEASED_CONFIG, "n_inner": "128"}, "mlp_hidden_dim must be an int >= 1 or None, got '128'"),
])
def test_mistyped_released_config_raises_value_error_naming_the_file(tmp_path, config, message):
    write_released_checkpoint(tmp_path, random_model(), config=config)
    with pytest.raises(ValueError, match=f"config.json at {path_pattern(tmp_path / 'config.json')}: .*{message}"):
        BasedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", ["half", "8 bytes", "nothing"])
@pytest.mark.parametrize("safe_serialization", [False, True])
def test_truncated_weights_raise_value_error_naming_the_file(tmp_path, safe_serialization, keep):
    saved_checkpoint(tmp_path, safe_serialization=safe_serialization)
    weights = tmp_path / ("model.safetensors" if safe_serialization else "pytorch_model.bin")
    data = weights.read_bytes()
    weights.write_bytes(data[:{"half": len(data) // 2, "8 bytes": 8, "nothing": 0}[keep]])
    with pytest.raises(ValueError, match=f"could not read the .* {path_pattern(weights)}") as raised:
        BasedLM.from_pretrained(tmp_path)
    assert raised.value.__cause__ is not None  # the reader's own error stays attached


def test_a_file_instead_of_the_checkpoint_directory(tmp_path):
    saved_checkpoint(tmp_path)
    with pytest.raises(NotADirectoryError, match=f"{path_pattern(tmp_path / 'config.json')} is a file: pass the "
                                                 "checkpoint directory"):
        BasedLM.from_pretrained(tmp_path / "config.json")
