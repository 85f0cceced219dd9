"""BasedLM and Transformer: preset architectures, configs, and cached decoding against the parallel forward."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from based.models import (BasedConfig, BasedLM, KVCache, ModelCache, Transformer, TransformerConfig,
                          attention_backend_name)
from based.nn import SlidingWindowCache
from tests.helpers import assert_close

VOCAB = 100
TINY_BASED = BasedConfig(d_model=64, n_layers=6, n_heads=4, vocab_size=VOCAB, linear_attention_layers=(1, 4),
                         sliding_window_layers=(2, 5), feature_dim=8, window=5)
TINY_TRANSFORMER = TransformerConfig(d_model=64, n_layers=4, n_heads=4, vocab_size=VOCAB)
TINY = {"based": (BasedLM, TINY_BASED), "transformer": (Transformer, TINY_TRANSFORMER)}
CHUNKINGS = {
    "one token at a time": [1] * 23,
    "uneven chunks": [4, 1, 1, 9, 1, 7],
    "prompt then tokens": [15] + [1] * 8,
}


def tiny_model(kind: str, **overrides):
    model_class, config = TINY[kind]
    torch.manual_seed(0)
    return model_class(dataclasses.replace(config, **overrides)).eval()


# ---- the released architectures -------------------------------------------------------------------

def expected_based_shapes(d: int, n_layers: int, linear_layers, window_layers) -> dict[str, tuple]:
    """The state dict DESIGN.md lists, written out independently of the model code."""
    vocab, heads, feature_dim, d_inner = 50264, 16, 16, 2 * d
    shapes = {"transformer.embeddings.word_embeddings.weight": (vocab, d), "transformer.ln_f.weight": (d,),
              "lm_head.weight": (vocab, d)}
    for i in range(n_layers):
        p = f"transformer.layers.{i}."
        shapes.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,),
                       p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc2.weight": (d, 2 * d)})
        if i in linear_layers:
            shapes.update({p + "mixer.proj_q.weight": (heads * feature_dim, d),
                           p + "mixer.proj_k.weight": (heads * feature_dim, d),
                           p + "mixer.proj_v.weight": (d, d), p + "mixer.out_proj.weight": (d, d)})
        elif i in window_layers:
            shapes.update({p + "mixer.Wqkv.weight": (3 * d, d), p + "mixer.out_proj.weight": (d, d)})
        else:
            shapes.update({p + "mixer.in_proj.weight": (2 * d_inner, d), p + "mixer.in_proj.bias": (2 * d_inner,),
                           p + "mixer.conv.conv.weight": (d_inner, 1, 3),
                           p + "mixer.out_proj.weight": (d, d_inner), p + "mixer.out_proj.bias": (d,)})
    return shapes


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


PRESETS = {
    "based-360m": (1024, 27, (1, 6, 11, 16, 21), (2, 7, 12, 17, 22), 362e6),
    "based-1.3b": (1792, 36, (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34), 1.35e9),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_based_presets_on_meta_device(preset):
    d, n_layers, linear_layers, window_layers, params = PRESETS[preset]
    with torch.device("meta"):
        model = BasedLM(BasedConfig.from_preset(preset))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_based_shapes(d, n_layers, linear_layers, window_layers)
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    assert abs(parameter_count(model) / params - 1) < 0.02, parameter_count(model)
    config = model.config
    assert (config.window, config.n_heads, config.head_dim, config.padded_vocab_size) == (129, 16, d // 16, 50264)


@pytest.mark.parametrize("size", ["360m", "1.3b"])
def test_transformer_presets_match_based_parameter_counts(size):
    with torch.device("meta"):
        based = BasedLM(BasedConfig.from_preset(f"based-{size}"))
        transformer = Transformer(TransformerConfig.from_preset(f"transformer-{size}"))
    assert abs(parameter_count(transformer) / parameter_count(based) - 1) < 0.05
    assert abs(parameter_count(transformer) / PRESETS[f"based-{size}"][-1] - 1) < 0.05
    keys = transformer.state_dict().keys()
    assert "transformer.layers.0.mixer.Wqkv.weight" in keys and "lm_head.weight" in keys
    assert transformer.config.mlp_hidden == {"360m": 2816, "1.3b": 5632}[size]


# ---- configs ------------------------------------------------------------------------------------------

def test_config_overrides_and_validation():
    config = BasedConfig.from_preset("based-1.3b", n_layers=40, window=17)
    assert (config.d_model, config.n_layers, config.window, config.mlp_hidden) == (1792, 40, 17, 3584)
    assert dataclasses.replace(config, d_model=256).mlp_hidden == 512
    assert BasedConfig() == BasedConfig.from_preset("based-360m")
    assert TransformerConfig() == TransformerConfig.from_preset("transformer-360m")
    assert BasedConfig.from_dict(config.to_dict()) == config
    assert [TINY_BASED.layer_kind(i) for i in range(3)] == ["base_conv", "linear_attention", "sliding_window"]
    with pytest.raises(ValueError, match="unknown BasedConfig preset"):
        BasedConfig.from_preset("based-7b")
    with pytest.raises(ValueError, match="in both"):
        dataclasses.replace(TINY_BASED, sliding_window_layers=(1, 2))
    with pytest.raises(ValueError, match=r"linear_attention_layers must hold distinct layer indices in \[0, 6\)"):
        dataclasses.replace(TINY_BASED, linear_attention_layers=(6,))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        dataclasses.replace(TINY_TRANSFORMER, n_heads=5)
    with pytest.raises(ValueError, match="window"):
        dataclasses.replace(TINY_BASED, window=0)
    with pytest.raises(ValueError, match="model_type"):
        TransformerConfig.from_dict(TINY_BASED.to_dict())


# ---- decoding equals the parallel forward -------------------------------------------------------------

@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("kind", TINY)
@torch.no_grad()
def test_cached_decoding_matches_parallel_forward(kind, chunking):
    model = tiny_model(kind)
    input_ids = torch.randint(0, VOCAB, (3, 23))
    expected = model(input_ids)
    assert expected.shape == (3, 23, 104)  # vocab padded to a multiple of 8
    cache = model.new_cache(3, 30)
    logits, start = [], 0
    for length in CHUNKINGS[chunking]:
        logits.append(model(input_ids[:, start:start + length], cache=cache))
        start += length
    assert int(cache.position) == 23
    assert_close(torch.cat(logits, dim=1), expected, torch.float32, f"{kind}, {chunking}")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", TINY)
@torch.no_grad()
def test_gpu_bfloat16_decoding_matches_parallel_forward(kind, batch):
    """On CUDA every decode kernel runs: Triton linear-attention, sliding-window and conv steps for Based,
    the variable-length FlashAttention-2 decode for the Transformer (d_model 128 gives head dim 32), and at
    batch 1 the matrix-vector kernels with the norms and residual adds fused."""
    model = tiny_model(kind, d_model=128).to("cuda", torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (batch, 40), device="cuda")
    cache = model.new_cache(batch, 48)
    logits = [model(input_ids[:, :9], cache=cache)] + [model(input_ids[:, t:t + 1], cache=cache)
                                                        for t in range(9, 40)]
    assert_close(torch.cat(logits, dim=1), model(input_ids), torch.bfloat16, kind)


@torch.no_grad()
def test_based_model_of_only_base_conv_layers_and_wide_window():
    for overrides in (dict(linear_attention_layers=(), sliding_window_layers=()), dict(window=1000)):
        model = tiny_model("based", **overrides)
        input_ids = torch.randint(0, VOCAB, (2, 12))
        cache = model.new_cache(2, 12)
        decoded = torch.cat([model(input_ids[:, :5], cache=cache)] + [model(input_ids[:, t:t + 1], cache=cache)
                                                                      for t in range(5, 12)], dim=1)
        assert_close(decoded, model(input_ids), torch.float32, str(overrides))


@pytest.mark.parametrize("kind", TINY)
@torch.no_grad()
def test_bfloat16_model_and_caches(kind):
    model = tiny_model(kind).to(torch.bfloat16)
    cache = model.new_cache(2, 8)
    assert cache.position.dtype == torch.int64 and cache.position.shape == ()
    logits = model(torch.randint(0, VOCAB, (2, 8)), cache=cache)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    if kind == "based":
        assert cache.layers[1].kv.dtype == torch.float32, "linear-attention state stays fp32"
    else:
        assert cache.layers[0].k.shape == (2, 8, 4, 16) and cache.layers[0].k.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", TINY)
@torch.no_grad()
def test_attention_layers_read_the_model_position_which_advances_once_per_call(kind):
    model = tiny_model(kind)
    cache = model.new_cache(1, 12)
    positioned = [c for c in cache.layers if isinstance(c, (SlidingWindowCache, KVCache))]
    assert positioned and all(c.position is cache.position and not c.advance for c in positioned)
    model(torch.randint(0, VOCAB, (1, 5)), cache=cache)
    model(torch.randint(0, VOCAB, (1, 1)), cache=cache)
    assert int(cache.position) == 6


@torch.no_grad()
def test_transformer_decode_falls_back_to_public_sdpa_when_the_private_flash_op_differs(monkeypatch):
    """Where SDPA-flash is the backend but this torch's `_flash_attention_forward` is not the one `_flash_decode`
    calls, a decode step takes the masked SDPA over the static cache: the parallel forward's logits."""
    from based.models import transformer

    monkeypatch.setattr(transformer, "attention_backend_name", lambda device, dtype: "SDPA-flash")
    monkeypatch.setattr(transformer, "flash_decode_available", lambda: False)
    monkeypatch.setattr(transformer, "_flash_decode", None)  # calling it would raise TypeError
    model = tiny_model("transformer")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 12)
    logits = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert_close(torch.cat(logits, dim=1), model(ids), torch.float32)


def test_flash_forward_schema_check():
    """The private op is called only with the schema the call was written for."""
    from based.models.transformer import flash_forward_schema_matches

    def packet(schema: str):
        return SimpleNamespace(default=SimpleNamespace(_schema=torch._C.parse_schema(schema)))

    assert flash_forward_schema_matches(torch.ops.aten._flash_attention_forward)
    assert not flash_forward_schema_matches(None)
    assert not flash_forward_schema_matches(SimpleNamespace())
    assert not flash_forward_schema_matches(packet(  # an argument inserted before is_causal
        "aten::f(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, Tensor? cum_seq_k, SymInt max_q, "
        "SymInt max_k, float dropout_p, float extra, bool is_causal, bool return_debug_mask, *, "
        "Tensor? seqused_k=None) -> (Tensor output)"))
    assert not flash_forward_schema_matches(packet(  # no seqused_k
        "aten::f(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, Tensor? cum_seq_k, SymInt max_q, "
        "SymInt max_k, float dropout_p, bool is_causal, bool return_debug_mask) -> (Tensor output)"))


def test_attention_backend_name_on_cpu():
    assert attention_backend_name("cpu", torch.bfloat16) == "math"
    assert attention_backend_name(torch.device("cpu"), torch.float32) == "math"


# ---- bad inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TINY)
def test_bad_inputs(kind):
    model = tiny_model(kind)
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"shape \[batch >= 1, seqlen >= 1\]"):
        model(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \[batch >= 1, seqlen >= 1\]"):
        model(torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="model is on cpu"):
        model(torch.zeros(2, 3, dtype=torch.int64, device="meta"))
    with pytest.raises(TypeError, match="ModelCache"):
        model(torch.zeros(2, 3, dtype=torch.int64), cache=object())
    with pytest.raises(ValueError, match="batch size 4"):
        model(torch.zeros(2, 3, dtype=torch.int64), cache=model.new_cache(4, 10))
    cache = model.new_cache(2, 10)
    with pytest.raises(ValueError, match="max_seqlen must be >= 1"):
        model.new_cache(2, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        model.new_cache(2.0, 5)
    assert isinstance(cache, ModelCache)


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("bad_id", [VOCAB, 103, 104, 10**6, -1])  # 103: a padding row; 104: past the padding
def test_ids_outside_the_vocabulary_raise(kind, bad_id):
    """Padding rows of the embedding (ids in [vocab_size, padded_vocab_size)) are no tokens either: forward
    names input_ids and the valid range instead of returning logits or raising IndexError."""
    model = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
        model(ids)
    cache = model.new_cache(2, 10)
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
        model(ids[:, 3:4], cache=cache)
    assert int(cache.position) == 0 and cache.consumed == 0, "nothing consumed by a rejected call"


@torch.no_grad()
def test_compiled_forward_has_no_graph_break():
    """The id-range check is skipped while torch.compile traces (it would need a host read of the ids)."""
    model = tiny_model("based")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert_close(compiled(ids), model(ids), torch.float32)


@pytest.mark.parametrize("chunk", [1, 3])
@torch.no_grad()
def test_transformer_decoding_past_max_seqlen_raises(chunk):
    """Its KV cache is max_seqlen long: one token (or a chunk) too many is a ValueError, before anything is
    written, checked on the host count (`ModelCache.consumed`) rather than by reading the device position."""
    model = tiny_model("transformer")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 10)
    model(ids[:, :9], cache=cache)
    model(ids[:, 9:10], cache=cache)
    assert cache.consumed == 10
    with pytest.raises(ValueError, match="cache holds 10 of max_seqlen 10 tokens"):
        model(ids[:, 10:10 + chunk], cache=cache)
    assert int(cache.position) == 10 and cache.consumed == 10


@torch.no_grad()
def test_based_decodes_past_max_seqlen():
    """Based's state does not grow and its sliding-window ring is `window` long: max_seqlen sizes nothing,
    so decoding (one token at a time and in chunks) runs past it and still matches the parallel forward."""
    model = tiny_model("based")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 4)
    chunks = [3, 1, 1, 6, 1, 1, 8]
    logits, start = [], 0
    for length in chunks:
        logits.append(model(ids[:, start:start + length], cache=cache))
        start += length
    assert cache.consumed == int(cache.position) == 21 - 1
    assert_close(torch.cat(logits, dim=1), model(ids), torch.float32)


def test_model_needs_its_own_config_class():
    with pytest.raises(TypeError, match="BasedConfig"):
        BasedLM(TINY_TRANSFORMER)


# ---- training: the fused loss and activation checkpointing ------------------------------------------

def reference_loss(model, ids, labels):
    logits = model(ids)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # .float(), fp64 kept
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())


@pytest.mark.parametrize("kind", ["based", "transformer"])
def test_labels_give_the_next_token_loss_and_its_gradients(kind):
    model = tiny_model(kind).train().double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, 4] = labels[1, 0] = -100
    loss = model(ids, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, ids, labels)
    ref.backward()
    assert loss.shape == () and abs(loss.item() - ref.item()) < 1e-10
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, torch.float64, name)


@pytest.mark.parametrize("kind", ["based", "transformer"])
def test_activation_checkpointing_changes_nothing_but_memory(kind):
    model = tiny_model(kind).train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        loss = model(ids, labels=ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7)


def test_compiled_training_forward_has_no_graph_break():
    model = tiny_model("based").train()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss = compiled(ids, labels=ids)
    loss.backward()
    assert abs(loss.item() - model(ids, labels=ids).item()) < 1e-6


def test_labels_are_checked():
    model = tiny_model("based")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="labels must be an int64 tensor shaped like input_ids"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="labels must be an int64 tensor shaped like input_ids"):
        model(ids, labels=ids.int())
    with pytest.raises(ValueError, match="labels and cache"):
        model(ids, model.new_cache(2, 8), labels=ids)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(ids, labels=ids + 1000)


def check_autocast_training(kind: str, device: str, T: int) -> None:
    """An fp32 model trained under bf16 autocast (the one-device path of examples/train.py): loss and every
    gradient agree with the fp64 computation to bf16's tolerance."""
    model = tiny_model(kind).train().to(device)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model = model.double()
    model.zero_grad()
    ref = model(ids, labels=ids)
    ref.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, torch.bfloat16, "loss")
    for name, p in model.named_parameters():
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], p.grad, torch.bfloat16, name)


@pytest.mark.parametrize("kind", TINY)
def test_training_under_autocast(kind):
    check_autocast_training(kind, "cpu", 19)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", TINY)
def test_gpu_training_under_autocast(kind):
    check_autocast_training(kind, "cuda", 300)
