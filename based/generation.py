"""Text generation shared by `BasedLM` and `Transformer`, in the style of gpt-fast.

A `DecodeSession` (`model.decode_session(batch_size, max_seqlen)`) owns what decoding needs: static caches
and, on a GPU, the decode step captured in a CUDA graph after a short eager warm-up. `session.generate(...)`
runs the prompt through the model once (prefill), filling the caches, then decodes one token per step,
replaying the graph: the step's inputs are a static token buffer and the caches' on-device position, so a
replay needs no Python and no host-device sync. The caller keeps the session for further calls (the caches
are zeroed in place, so the graph's addresses stay valid) and frees its memory by dropping it.
`model.generate(...)` makes a session for one call.
"""
from __future__ import annotations

import contextlib
import sys
from numbers import Real

import torch

from based.ops._backend import chaining_disabled

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


def check_token_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id in `[0, vocab_size)` (one host read of the ids' extremes)."""
    low, high = torch.aminmax(input_ids)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values in [{int(low)}, {int(high)}]")


class DecodeSession:
    """Decode state for `batch_size` sequences of up to `max_seqlen` tokens each, owned by the caller.

    Holds the model's caches (`cache`, a `ModelCache`) and, with CUDA graphs, the captured decode step and its
    static buffers. Reusing a session reuses both: the graph is captured once (after `WARMUP_STEPS` eager
    steps on a side stream) and replayed by every later step of every `generate` call. Drop the session to
    free them. `max_seqlen` bounds prompt + new tokens for the Transformer (its KV cache is that long); Based's
    caches do not grow with the sequence, so a Based session decodes any number of tokens.

    The graph holds raw addresses of the caches and the weights: update weights in place (`copy_`) between
    calls, never by replacing the parameter tensors (moving or casting the model); a session whose model's
    parameters were replaced refuses to run.

    Args:
        model: a `BasedLM` or `Transformer` (a `based.models.CausalLM`).
        batch_size, max_seqlen: ints >= 1.
        cuda_graph: replay the decode step from a CUDA graph. None means on for CUDA models; True on any other
            device raises ValueError.
        chained: let the captured graph's decode kernels use programmatic dependent launch on Hopper and newer
            (`based.ops._backend.chained_launch`); False captures them unchained (same results, the plain
            launch order; for debugging or profiling kernels one at a time).

    Raises:
        TypeError, ValueError: as `model.new_cache` for batch_size and max_seqlen; a non-bool cuda_graph or
            chained, or cuda_graph=True off a GPU.
    """

    def __init__(self, model, batch_size: int, max_seqlen: int, *, cuda_graph: bool | None = None,
                 chained: bool = True):
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
        if not isinstance(chained, bool):
            raise TypeError(f"chained must be a bool, got {chained!r}")
        on_cuda = model.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {model.device}")
        self.model, self.chained = model, chained
        self.use_graph = on_cuda if cuda_graph is None else cuda_graph
        self.cache = model.new_cache(batch_size, max_seqlen)
        self._parameters = self._parameter_addresses()
        self._steps = 0
        self._graph = self._static_token = self._static_logits = None
        self._side_stream = torch.cuda.Stream(device=model.device) if self.use_graph else None

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_seqlen(self) -> int:
        return self.cache.max_seqlen

    @staticmethod
    def steps_before_replay() -> int:
        """Decode steps of a session that run eagerly or capture; every later one replays the graph."""
        return WARMUP_STEPS + 1

    def reset(self) -> None:
        """Empty the caches in place (the captured graph stays valid); `generate` does this itself."""
        self.cache.reset()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, progress: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Reset the caches and continue each prompt in `input_ids` by `max_new_tokens` tokens.

        Args:
            input_ids: int64 `[batch_size, T]` prompts on the model's device, ids in `[0, config.vocab_size)`;
                for the Transformer T + max_new_tokens <= max_seqlen.
            max_new_tokens, temperature, top_k, top_p, progress, generator: as for `CausalLM.generate`.

        Returns:
            int64 `[batch_size, T + max_new_tokens]`: the prompts followed by the new tokens, all below
            `config.vocab_size`.

        Raises:
            TypeError, ValueError: as `CausalLM.generate`; also ValueError for a batch size other than the
            session's, for T + max_new_tokens past a Transformer session's max_seqlen, or when the model's
            parameters were replaced since the session was made.
        """
        model = self.model
        check_input_ids(input_ids, model.device)
        self.check_options(max_new_tokens, temperature, top_k, top_p, generator)
        check_token_range(input_ids, model.config.vocab_size)
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has batch size {B} but the session holds {self.batch_size}")
        if self.cache.bounded and T + max_new_tokens > self.max_seqlen:
            raise ValueError(f"a prompt of {T} tokens and max_new_tokens={max_new_tokens} do not fit the session's "
                             f"max_seqlen {self.max_seqlen}")
        if self._parameter_addresses() != self._parameters:
            raise ValueError("the model's parameters were replaced (moved or cast) since this session was made; "
                             "make a new session")
        vocab_size = model.config.vocab_size

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_next_token(logits[:, :vocab_size], temperature=temperature, top_k=top_k, top_p=top_p,
                                     generator=generator)

        tokens = input_ids.new_empty(B, T + max_new_tokens)
        tokens[:, :T] = input_ids
        if max_new_tokens == 0:
            return tokens
        self.reset()
        bar = _progress_bar(max_new_tokens, progress)
        token = sample(model._logits(input_ids, self.cache)[:, -1])
        tokens[:, T] = token
        bar.update()
        for i in range(1, max_new_tokens):
            token = sample(self.step(token))
            tokens[:, T + i] = token
            bar.update()
        bar.close()
        return tokens

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step after a prefill (`model(prompt, cache=session.cache)`, or a cache filled with
        `session.cache.copy_(...)`), advancing the caches by one token. Eager for the first `WARMUP_STEPS`
        steps of the session's life, then captured once and replayed (also across `reset` and `generate`).

        Args:
            token: int64 `[batch_size]` on the model's device, ids below `config.vocab_size`. Not checked: a
                check would read the device on every step (`generate` passes sampled ids).

        Returns:
            the logits `[batch_size, padded_vocab_size]` at the new position. With a CUDA graph this is the
            graph's static output buffer: the next step overwrites it, so copy what must outlive that step.

        Raises:
            ValueError: for a Transformer session whose cache already holds max_seqlen tokens.
        """
        self._steps += 1
        if not self.use_graph:
            return self.model._logits(token[:, None], self.cache)[:, -1]
        if self._steps <= WARMUP_STEPS:
            # The side stream first waits for the main stream, so no memory it reuses is still being
            # read there; afterwards the main stream waits for it.
            self._side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side_stream):
                logits = self.model._logits(token[:, None], self.cache)[:, -1]
            torch.cuda.current_stream().wait_stream(self._side_stream)
            return logits
        if self._graph is None:
            self._capture(token)
        # The captured forward counted nothing (it ran no kernel); each replay consumes one token.
        self.cache.consume(1)
        self._static_token.copy_(token[:, None])
        self._graph.replay()
        return self._static_logits

    def _capture(self, token: torch.Tensor) -> None:
        """Record the model's forward into a graph; capturing runs no kernel, so the cache is not advanced."""
        self._static_token = token[:, None].clone()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), (contextlib.nullcontext() if self.chained else chaining_disabled()):
            self._static_logits = self.model._logits(self._static_token, self.cache)[:, -1]

    def _parameter_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.parameters())

    @staticmethod
    def check_options(max_new_tokens, temperature, top_k, top_p, generator) -> None:
        """The generation options of `CausalLM.generate`: TypeError/ValueError naming the one that is wrong."""
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
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


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
