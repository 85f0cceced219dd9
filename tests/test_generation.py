"""generate(): greedy decoding against the parallel forward, sampling options, CUDA graphs, bad inputs."""
import dataclasses

import pytest
import torch

from based.generation import sample_next_token
from based.models import BasedConfig, BasedLM, Transformer, TransformerConfig

VOCAB = 100
CONFIGS = {
    "based": (BasedLM, BasedConfig(d_model=64, n_layers=5, n_heads=4, vocab_size=VOCAB, linear_attention_layers=(1,),
                                   sliding_window_layers=(2, 4), feature_dim=8, window=4)),
    "transformer": (Transformer, TransformerConfig(d_model=64, n_layers=4, n_heads=4, vocab_size=VOCAB)),
}


def tiny_model(kind: str, device="cpu", **overrides):
    model_class, config = CONFIGS[kind]
    torch.manual_seed(0)
    return model_class(dataclasses.replace(config, **overrides)).to(device).eval()


def prompts(batch=3, length=7, device="cpu"):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


def assert_greedy(model, prompt, out):
    """Each generated token is the argmax (over the real vocab) of the parallel forward's logits."""
    T = prompt.shape[1]
    assert torch.equal(out[:, :T], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, T - 1:, :VOCAB]
    assert torch.equal(out[:, T:], logits.argmax(-1))


@pytest.mark.parametrize("prompt_len", [1, 7])
@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_equals_argmax_of_the_parallel_forward(kind, prompt_len):
    model = tiny_model(kind)
    prompt = prompts(length=prompt_len)
    out = model.generate(prompt, 12)
    assert out.shape == (3, prompt_len + 12) and out.dtype == torch.int64
    assert_greedy(model, prompt, out)


@pytest.mark.parametrize("kind", CONFIGS)
def test_sampling_options(kind):
    model = tiny_model(kind)
    prompt = prompts()
    greedy = model.generate(prompt, 8)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_p=1e-6), greedy)

    torch.manual_seed(123)
    first = model.generate(prompt, 8, temperature=1.0, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=20, top_p=0.9), first)
    seeded = lambda seed: model.generate(prompt, 8, temperature=1.5,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(seeded(7), seeded(7))
    assert not torch.equal(seeded(7), seeded(8))
    assert int(seeded(9)[:, 7:].max()) < VOCAB


def test_padding_rows_of_the_vocabulary_are_never_generated():
    model = tiny_model("based", tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[:VOCAB] = 0  # every real token scores 0; the 4 padding rows score h . w
        model.lm_head.weight[VOCAB:] = model.lm_head.weight[VOCAB:].abs()
    prompt = prompts()
    with torch.no_grad():
        assert (model(prompt).argmax(-1) >= VOCAB).any(), "the padding rows must win to make this test mean something"
    assert int(model.generate(prompt, 6).max()) < VOCAB
    assert int(model.generate(prompt, 6, temperature=1.0).max()) < VOCAB


def test_sample_next_token_restricts_to_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(2000, 4)
    draw = lambda **kw: set(sample_next_token(logits, temperature=1.0,  # noqa: E731
                                              generator=torch.Generator().manual_seed(0), **kw).tolist())
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {1, 3}
    assert draw(top_p=0.7) == {1, 3}  # 0.5 < 0.7 keeps the second; 0.8 >= 0.7 stops there
    assert draw(top_p=0.5) == {1}
    assert draw(top_k=3, top_p=0.85) == {1, 2, 3}
    assert sample_next_token(logits[:3]).tolist() == [1, 1, 1]


def test_zero_new_tokens_and_progress(capsys):
    model = tiny_model("transformer")
    prompt = prompts()
    assert torch.equal(model.generate(prompt, 0), prompt)
    model.generate(prompt, 5, progress=True)
    assert "5/5" in capsys.readouterr().err


@pytest.mark.parametrize("kind", CONFIGS)
def test_bad_inputs(kind):
    model = tiny_model(kind)
    prompt = prompts()
    cases = [
        (TypeError, "int64", dict(input_ids=prompt.float())),
        (ValueError, "shape", dict(input_ids=prompt[0])),
        (ValueError, "shape", dict(input_ids=prompt[:, :0])),
        (ValueError, r"\[0, 100\)", dict(input_ids=prompt + VOCAB)),
        (ValueError, r"\[0, 100\)", dict(input_ids=-prompt - 1)),
        (ValueError, "max_new_tokens", dict(max_new_tokens=-1)),
        (TypeError, "max_new_tokens", dict(max_new_tokens=2.0)),
        (ValueError, "temperature", dict(temperature=-0.5)),
        (TypeError, "temperature", dict(temperature="hot")),
        (ValueError, "top_k", dict(top_k=0)),
        (TypeError, "top_k", dict(top_k=2.5)),
        (ValueError, "top_p", dict(top_p=0.0)),
        (ValueError, "top_p", dict(top_p=1.5)),
        (ValueError, "cuda_graph=True needs a CUDA model", dict(cuda_graph=True)),
        (TypeError, "cuda_graph", dict(cuda_graph="yes")),
        (TypeError, "generator", dict(generator=0)),
    ]
    for error, message, overrides in cases:
        call = {"input_ids": prompt, "max_new_tokens": 3, **overrides}
        with pytest.raises(error, match=message):
            model.generate(call.pop("input_ids"), call.pop("max_new_tokens"), **call)

@pytest.mark.parametrize("kind", CONFIGS)
def test_a_reused_session_gives_the_tokens_of_fresh_calls(kind):
    """One session, several generate calls of different lengths (the caches reset in place between them): the
    same tokens as one-call model.generate, whose session is not kept: nothing new stays on the model."""
    model = tiny_model(kind)
    first, second = prompts(), prompts(length=3)
    attributes = set(vars(model))
    expected_first, expected_second = model.generate(first, 8), model.generate(second, 12)
    assert set(vars(model)) == attributes, "model.generate keeps nothing on the model"
    session = model.decode_session(3, 15)
    assert torch.equal(session.generate(first, 8), expected_first)
    assert torch.equal(session.generate(second, 12), expected_second)
    assert torch.equal(session.generate(first, 8), expected_first)
    assert session.cache.consumed == 7 + 8 - 1, "the last sampled token is not fed back"


def test_a_based_session_decodes_past_its_max_seqlen():
    """Based's caches do not grow: a session made for 4 tokens generates 7 + 9 (Transformer sessions refuse)."""
    model = tiny_model("based")
    prompt = prompts()
    assert torch.equal(model.decode_session(3, 4).generate(prompt, 9), model.generate(prompt, 9))
    with pytest.raises(ValueError, match="do not fit the session's max_seqlen 4"):
        tiny_model("transformer").decode_session(3, 4).generate(prompt, 9)


@pytest.mark.parametrize("kind", CONFIGS)
def test_bad_session_arguments(kind):
    model = tiny_model(kind)
    with pytest.raises(TypeError, match="chained must be a bool"):
        model.decode_session(3, 20, chained=None)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        model.decode_session(3, 20, cuda_graph=True)
    with pytest.raises(ValueError, match="max_seqlen must be >= 1"):
        model.decode_session(3, 0)
    session = model.decode_session(3, 20)
    with pytest.raises(ValueError, match="input_ids has batch size 2 but the session holds 3"):
        session.generate(prompts(batch=2), 4)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        session.generate(prompts() + VOCAB, 4)
    model.double()  # new parameter tensors: a captured graph would read the old ones
    with pytest.raises(ValueError, match="parameters were replaced"):
        session.generate(prompts(), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", CONFIGS)
def test_cuda_graph_decoding_on_gpu(kind):
    """Graph replay, chained (programmatic dependent launch on Hopper) or not, gives the eager greedy tokens,
    in one call and from a reused session (whose second call replays the graph captured by the first)."""
    model = tiny_model(kind, device="cuda")
    prompt = prompts(device="cuda")
    eager = model.generate(prompt, 16, cuda_graph=False)
    assert_greedy(model, prompt, eager)
    assert torch.equal(model.generate(prompt, 16, cuda_graph=True), eager)
    for chained in (True, False):
        session = model.decode_session(3, 7 + 16, cuda_graph=True, chained=chained)
        assert torch.equal(session.generate(prompt, 16), eager), f"chained={chained}"
        assert torch.equal(session.generate(prompt, 16), eager), f"chained={chained}, replayed"
    half = model.to(torch.bfloat16)
    half_graph = half.generate(prompt, 16)
    assert torch.equal(half_graph, half.generate(prompt, 16, cuda_graph=False))
