"""Text generation shared by `BasedLM` and `Transformer`, in the style of gpt-fast.

`generate` runs the prompt through the model once (prefill), filling preallocated static caches, then
decodes one token per step. On a GPU the decode step is captured in a CUDA graph after a short eager
warm-up and replayed for every later token: the step's inputs are a static token buffer and the
caches' on-device position tensors, so replaying it needs no Python and no host-device sync. The graph and
its caches are kept on the model for the next call with the same batch size and length (the caches are
zeroed in place, so the graph's addresses stay valid); a call with another shape replaces them.
"""
from __future__ import annotations

import sys
from numbers import Real

import torch

# Eager decode steps before capture: they run on a side stream, as the CUDA graph documentation asks,
# so lazy one-time initialisation (library handles, workspaces) happens outside the capture.
WARMUP_STEPS = 2


def check_input_ids(input_ids, device: torch.device) -> None:
    """`input_ids` must be an int64 `[B, T]` tensor, B, T >= 1, on the model's device."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be int64 (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must have shape [batch >= 1, seqlen >= 1], got {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, cuda_graph: bool | None = None,
             progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each prompt in `input_ids` by `max_new_tokens` tokens.

    Args:
        model: a `BasedLM` or `Transformer` (anything with `new_cache`, `config.vocab_size` and the
            `model(input_ids, cache=cache)` convention).
        input_ids: int64 `[B, T]` prompts on the model's device, ids in `[0, config.vocab_size)`.
        max_new_tokens: how many tokens to append (0 returns the prompt).
        temperature: 0 picks the most likely token (greedy; top_k and top_p are then moot); > 0 samples
            from `softmax(logits / temperature)`.
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of most likely tokens whose probability reaches top_p.
        cuda_graph: replay the decode step from a CUDA graph. None means on for CUDA models; True on any
            other device raises ValueError.
        progress: show a progress bar on stderr (tqdm when installed, else a counter).
        generator: a `torch.Generator` on the model's device for reproducible sampling (else the global
            RNG, seeded by `torch.manual_seed`).

    Returns:
        int64 `[B, T + max_new_tokens]`: the prompts followed by the new tokens. Only ids below
        `config.vocab_size` are produced (the rows that pad the embedding to a multiple are never sampled).
    """
    check_input_ids(input_ids, model.device)
    vocab_size = model.config.vocab_size
    _check_generation_args(max_new_tokens, temperature, top_k, top_p, cuda_graph, generator)
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    on_cuda = model.device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {model.device}")
    use_graph = on_cuda if cuda_graph is None else cuda_graph

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits[:, :vocab_size], temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)

    B, T = input_ids.shape
    tokens = input_ids.new_empty(B, T + max_new_tokens)
    tokens[:, :T] = input_ids
    if max_new_tokens == 0:
        return tokens
    cache, decode_step = _decode_state(model, B, T + max_new_tokens, use_graph)
    bar = _progress_bar(max_new_tokens, progress)
    token = sample(model(input_ids, cache=cache)[:, -1])
    tokens[:, T] = token
    bar.update()
    for i in range(1, max_new_tokens):
        token = decode_step(token, sample)
        tokens[:, T + i] = token
        bar.update()
    bar.close()
    return tokens


def _decode_state(model, batch_size: int, max_seqlen: int, use_graph: bool):
    """(cache, DecodeStep) for this call: a fresh pair, or with CUDA graphs the model's pair of the last call
    of this shape with its caches zeroed, so the captured graph is replayed instead of captured again."""
    # The graph holds raw addresses: of the caches (kept with it) and of the weights, so a model moved or
    # cast since (new parameter tensors) must not replay it. In-place weight updates are fine.
    key = (batch_size, max_seqlen, tuple(p.data_ptr() for p in model.parameters()))
    kept = getattr(model, "_graph_decode", None)
    if use_graph and kept is not None and kept[0] == key:
        cache, decode_step = kept[1], kept[2]
        for tensor in cache.layer_tensors():
            tensor.zero_()
        cache.position.zero_()
        return cache, decode_step
    model._graph_decode = None  # free the previous shape's graph and caches before allocating new ones
    cache = model.new_cache(batch_size, max_seqlen)
    decode_step = DecodeStep(model, cache, use_graph)
    if use_graph:
        model._graph_decode = (key, cache, decode_step)
    return cache, decode_step


class DecodeStep:
    """`sample(model(token, cache=cache))` for one token per sequence, replayed from a CUDA graph if asked.

    With `use_graph`, the first `WARMUP_STEPS` calls run eagerly on a side stream; the next call
    captures the model's forward into a graph (capturing records kernels without running them, so the
    cache is not advanced twice) and every call replays it with the new token copied into a static
    buffer. Sampling stays outside the graph: it is cheap and its options vary.
    """

    @staticmethod
    def steps_before_replay() -> int:
        """Calls that run eagerly or capture; every later call replays the graph."""
        return WARMUP_STEPS + 1

    def __init__(self, model, cache, use_graph: bool):
        self.model, self.cache, self.use_graph = model, cache, use_graph
        self.calls = 0
        self.graph = self.static_token = self.static_logits = None
        self.side_stream = torch.cuda.Stream(device=model.device) if use_graph else None

    def __call__(self, token: torch.Tensor, sample) -> torch.Tensor:
        self.calls += 1
        if not self.use_graph:
            return sample(self.model(token[:, None], cache=self.cache)[:, -1])
        if self.calls <= WARMUP_STEPS:
            # The side stream first waits for the main stream, so no memory it reuses is still being
            # read there; afterwards the main stream waits for it.
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                token = sample(self.model(token[:, None], cache=self.cache)[:, -1])
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return token
        if self.graph is None:
            self._capture(token)
        self.static_token.copy_(token[:, None])
        self.graph.replay()
        return sample(self.static_logits)

    def _capture(self, token: torch.Tensor) -> None:
        self.static_token = token[:, None].clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self.model(self.static_token, cache=self.cache)[:, -1]


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` `[B, V]` -> int64 `[B]`; the options are those of `generate`."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep a token while the tokens ranked above it hold less than top_p (the top one always stays).
        mass_above = sorted_probs.cumsum(-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_above >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_generation_args(max_new_tokens, temperature, top_k, top_p, cuda_graph, generator) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, Real):
            raise TypeError(f"top_p must be a number or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


class _StderrCounter:
    """The progress bar when tqdm is not installed: `generated 12/64 tokens` rewritten in place."""

    def __init__(self, total: int):
        self.total, self.count = total, 0

    def update(self) -> None:
        self.count += 1
        print(f"\rgenerated {self.count}/{self.total} tokens", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


class _NoProgress:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrCounter(total)
    return tqdm(total=total, desc="generating", unit="tok")
