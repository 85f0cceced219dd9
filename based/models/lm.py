"""The language-model skeleton both models share: embeddings, pre-norm blocks, final norm, tied LM head.

`BasedLM` and `Transformer` differ only in the mixer each block gets (`build_mixer`); the forward pass,
the decode cache, generation and checkpoint I/O live here once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils._pytree import tree_leaves

from based.generation import DecodeSession, check_input_ids, check_token_range
from based.models.checkpoint import load_pretrained, save_pretrained
from based.nn import Block, GatedMlp, RMSNorm
from based.nn.projection import project
from based.ops import linear_cross_entropy


@dataclass
class ModelCache:
    """Preallocated decode state of a whole model, from `model.new_cache(batch_size, max_seqlen)`.

    layers:     one cache per layer (whatever that layer's mixer keeps), advanced in place.
    position:   0-dim int64 tensor on the model's device: how many tokens have been consumed. Kept on
                the device and advanced in place so a decode step can be captured in a CUDA graph.
    max_seqlen: the size the cache was made for.
    batch_size: the number of sequences it holds.
    bounded:    whether `max_seqlen` is a hard limit (the Transformer's KV cache is that long); Based's
                caches do not grow with the sequence, so it may consume any number of tokens.
    consumed:   the same count as `position`, kept on the host so the limit is checked without reading the
                device. The model's forward advances it, except while a CUDA graph is captured (the captured
                step consumes nothing until replayed: whoever replays it calls `consume`) or compiled.
    """

    layers: list
    position: torch.Tensor
    max_seqlen: int
    batch_size: int
    bounded: bool
    consumed: int = 0

    def consume(self, count: int) -> None:
        """Count `count` more tokens; ValueError, before anything is written, when a bounded cache has no room."""
        if self.bounded and self.consumed + count > self.max_seqlen:
            raise ValueError(f"cache holds {self.consumed} of max_seqlen {self.max_seqlen} tokens; {count} more "
                             f"do not fit (make the cache with a larger max_seqlen)")
        self.consumed += count

    def reset(self) -> None:
        """Back to empty, in place (the tensors keep their addresses, so a graph captured over them stays valid)."""
        for tensor in self._tensors():
            tensor.zero_()
        self.position.zero_()
        self.consumed = 0

    def copy_(self, source: ModelCache) -> None:
        """Take over `source`'s state in place; a cache of one sequence is broadcast to every row of this one."""
        for dst, src in zip(self._tensors(), source._tensors(), strict=True):
            dst.copy_(src)
        self.position.copy_(source.position)
        self.consumed = source.consumed

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer caches hold, in a fixed order (a layer sharing the model's position lists it)."""
        return [leaf for leaf in tree_leaves(self.layers) if isinstance(leaf, torch.Tensor)]


class TokenEmbeddings(nn.Module):
    """Holds `word_embeddings`, the name the released checkpoints use."""

    def __init__(self, vocab_size: int, d_model: int, *, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class Backbone(nn.Module):
    """`embeddings`, `layers`, `ln_f`: everything but the LM head."""

    def __init__(self, embeddings: TokenEmbeddings, layers: list[Block], ln_f: RMSNorm):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.ln_f = ln_f


class CausalLM(nn.Module):
    """Base class of `BasedLM` and `Transformer`. Subclasses set `config_class` and `build_mixer`.

    Calling convention (both models):
      `model(input_ids)` -> logits `[B, T, padded_vocab_size]`;
      `cache = model.new_cache(batch_size, max_seqlen)`; `model(input_ids, cache=cache)` consumes the
      tokens (a prompt chunk of any length, or one token per decode step), advances the cache in place
      and returns the logits the parallel forward gives at those positions;
      `model.generate(input_ids, max_new_tokens, ...)`, or `model.decode_session(...)` to keep the decode
      state (caches, CUDA graph) between calls (`based.generation.DecodeSession`).
    Decode under `torch.no_grad()` / `torch.inference_mode()`: the caches are updated in place.
    """

    config_class: type
    # Whether a cache holds at most `max_seqlen` tokens (a static KV cache) or any number (recurrent state).
    bounded_cache: bool = False
    # Recompute each block's activations in the backward instead of keeping them (training at long contexts):
    # set `model.activation_checkpointing = True`. Applies to forwards without a cache while gradients are on.
    activation_checkpointing: bool = False

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        placement = dict(device=device, dtype=dtype)
        layers = [
            Block(config.d_model, self.build_mixer(i, **placement),
                  GatedMlp(config.d_model, config.mlp_hidden, **placement), norm_eps=config.norm_eps, **placement)
            for i in range(config.n_layers)
        ]
        self.transformer = Backbone(TokenEmbeddings(config.padded_vocab_size, config.d_model, **placement), layers,
                                    RMSNorm(config.d_model, config.norm_eps, **placement))
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **placement)
        self.apply(self._init_weights)
        self.tie_weights()

    def build_mixer(self, layer_idx: int, *, device=None, dtype=None) -> nn.Module:
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embeddings (when the config ties them)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth.
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        for name in ("out_proj", "fc2"):
            projection = getattr(module, name, None)
            if isinstance(projection, nn.Linear):
                nn.init.normal_(projection.weight, std=std / math.sqrt(2 * self.config.n_layers))

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch_size: int, max_seqlen: int) -> ModelCache:
        """Empty decode caches for `batch_size` sequences of up to `max_seqlen` tokens (prompt included; a limit
        for the Transformer, whose KV cache is that long, and only a size for Based, whose state does not grow),
        on the model's device and in its dtype (recurrent states in fp32)."""
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        position = torch.zeros((), dtype=torch.int64, device=self.device)
        # The layers that track the position read this one, which forward advances once per call: one launch
        # per such layer saved, and one break fewer in the chain of a decode graph's kernels
        # (`_backend.chained_launch`), whose next GEMV could otherwise not load its weights early.
        layers = [layer.new_cache(batch_size, max_seqlen, device=self.device, dtype=self.dtype, position=position)
                  for layer in self.transformer.layers]
        return ModelCache(layers, position, max_seqlen, batch_size, self.bounded_cache)

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, *,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, padded_vocab_size]` for `input_ids` `[B, T]` (int64, ids in `[0, config.vocab_size)`).

        With `cache`, the tokens continue the sequence the cache has consumed; the Transformer raises ValueError
        when they would pass its `max_seqlen`, Based decodes on for any number of tokens.

        With `labels` (`[B, T]` int64, aligned with `input_ids` as Hugging Face models take them: position t's
        label is the token at t; -100 is ignored) it returns the mean next-token cross-entropy instead, a 0-dim
        fp32 tensor: `F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())`, computed
        by `based.ops.linear_cross_entropy` in chunks of tokens fused with the LM head, so the full logits are
        never formed. Not with a cache.

        The id range is checked with one host read of the ids, skipped where it would cost a sync inside a
        decode step: while a CUDA graph is captured and while `torch.compile` traces (so
        `torch.compile(model, fullgraph=True)` has no graph break). The cache's length is checked on the host
        (`ModelCache.consumed`), never by reading the device position.
        """
        check_input_ids(input_ids, self.device)
        if not self._tracing():
            check_token_range(input_ids, self.config.vocab_size)
        if labels is None:
            return self._logits(input_ids, cache)
        if cache is not None:
            raise ValueError("labels and cache cannot be given together: the loss is a training-time forward")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be an int64 tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__} "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else ''}")
        if labels.device != input_ids.device:
            raise ValueError(f"labels is on {labels.device} but input_ids on {input_ids.device}")
        hidden = self.transformer.ln_f(self._residual(input_ids, None))
        return linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.lm_head.weight, labels[:, 1:].flatten())

    def _logits(self, input_ids: torch.Tensor, cache: ModelCache | None) -> torch.Tensor:
        """`forward` without the id-range check: for decode steps whose ids were sampled below vocab_size."""
        B, T = input_ids.shape
        if cache is not None:
            self._check_cache(cache, B)
            if not self._tracing():
                cache.consume(T)
        logits = project(self.lm_head, self._residual(input_ids, cache), norm=self.transformer.ln_f)
        if cache is not None:
            cache.position.add_(T)
        return logits

    def _residual(self, input_ids: torch.Tensor, cache: ModelCache | None) -> torch.Tensor:
        """The residual stream after the last block (before the final norm)."""
        layer_caches = cache.layers if cache is not None else [None] * len(self.transformer.layers)
        residual = self.transformer.embeddings(input_ids)
        checkpointed = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for layer, layer_cache in zip(self.transformer.layers, layer_caches):
            if checkpointed:
                residual = torch.utils.checkpoint.checkpoint(layer, residual, use_reentrant=False)
            else:
                residual = layer(residual, layer_cache)
        return residual

    def _tracing(self) -> bool:
        """Whether this forward is being captured into a CUDA graph or traced by torch.compile: Python runs once
        for many replays, so host-side checks and counts belong to the caller."""
        return torch.compiler.is_compiling() or (self.device.type == "cuda"
                                                  and torch.cuda.is_current_stream_capturing())

    def _check_cache(self, cache: ModelCache, batch_size: int) -> None:
        if not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be a ModelCache from model.new_cache, got {type(cache).__name__}")
        if len(cache.layers) != len(self.transformer.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.transformer.layers)}")
        if cache.batch_size != batch_size:
            raise ValueError(f"cache holds batch size {cache.batch_size} but input_ids has batch size {batch_size}")

    def decode_session(self, batch_size: int, max_seqlen: int, *, cuda_graph: bool | None = None,
                       chained: bool = True) -> DecodeSession:
        """Decode state the caller keeps: caches and, on a GPU, the captured decode graph, reused by every
        `session.generate(...)` and freed by dropping the session (`based.generation.DecodeSession`).

        Args:
            batch_size: the number of sequences each `session.generate` call takes, >= 1.
            max_seqlen: prompt + new tokens per call, >= 1: a limit for the Transformer (its KV cache is that
                long), a size hint for Based (whose state does not grow).
            cuda_graph: replay decode steps from a CUDA graph; None means on for CUDA models.
            chained: let the captured kernels use programmatic dependent launch (Hopper and newer); False
                captures them unchained.

        Returns:
            a `DecodeSession` with `generate(input_ids, max_new_tokens, ...)`, `step(token)`, `reset()` and
            `cache`.

        Raises:
            TypeError: a non-int batch_size or max_seqlen, a non-bool cuda_graph or chained.
            ValueError: batch_size or max_seqlen < 1; cuda_graph=True for a model that is not on a GPU.
        """
        return DecodeSession(self, batch_size, max_seqlen, cuda_graph=cuda_graph, chained=chained)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, cuda_graph: bool | None = None,
                 progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each prompt in `input_ids` by `max_new_tokens` tokens, in one call.

        Makes a `DecodeSession` sized for this call (`[B, T + max_new_tokens]`), generates with it and lets it
        go: nothing (no cache, no CUDA graph) stays on the model. To reuse caches and the captured graph
        across calls, keep a session instead: `session = model.decode_session(B, max_seqlen)`,
        `session.generate(...)`.

        Args:
            input_ids: int64 `[B, T]` prompts on the model's device, ids in `[0, config.vocab_size)`.
            max_new_tokens: how many tokens to append, >= 0 (0 returns the prompt).
            temperature: 0 picks the most likely token (greedy; top_k and top_p are then moot); > 0 samples
                from `softmax(logits / temperature)`.
            top_k: sample only among the k most likely tokens (an int >= 1, or None for all).
            top_p: sample only from the smallest set of most likely tokens whose probability reaches top_p
                (in (0, 1], or None for all).
            cuda_graph: replay the decode step from a CUDA graph. None means on for CUDA models; True on any
                other device raises ValueError.
            progress: show a progress bar on stderr (tqdm when installed, else a counter).
            generator: a `torch.Generator` on the model's device for reproducible sampling (else the global
                RNG, seeded by `torch.manual_seed`).

        Returns:
            int64 `[B, T + max_new_tokens]`: the prompts followed by the new tokens. Only ids below
            `config.vocab_size` are produced (the rows that pad the embedding to a multiple are never sampled).

        Raises:
            TypeError: input_ids not an int64 tensor, or an option of the wrong type.
            ValueError: input_ids not `[B >= 1, T >= 1]`, on another device, or with ids outside
                `[0, config.vocab_size)`; a negative max_new_tokens or temperature, top_k < 1, top_p outside
                (0, 1]; cuda_graph=True off a GPU.
        """
        DecodeSession.check_options(max_new_tokens, temperature, top_k, top_p, generator)
        check_input_ids(input_ids, self.device)
        B, T = input_ids.shape
        session = self.decode_session(B, T + max_new_tokens, cuda_graph=cuda_graph)
        return session.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                progress=progress, generator=generator)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype: torch.dtype | None = None):
        """Build this model class from a checkpoint directory on the local disk.

        Reads `path/config.json` (the released GPT-2-style Based config, or the one `save_pretrained`
        writes) and the weights: every `*.safetensors` file in `path` (merged), else
        `path/pytorch_model.bin` (loaded with `weights_only=True`). Nothing is downloaded and nothing in
        `path` is written. The model is built on the meta device and materialised once on `device`, so it
        is never randomly initialised first. State-dict keys may carry a leading `model.`; keys containing
        `metrics` and rotary `inv_freq` entries are ignored. Every other parameter must be present with
        the shape the config gives (e.g. the embedding `[padded_vocab_size, d_model]`); a checkpoint
        without `lm_head.weight` is fine when the config ties it to the embedding.

        Args:
            path: the checkpoint directory (str or `os.PathLike`), not a file inside it.
            device: where the parameters live (anything `torch.device` accepts); CPU when None.
            dtype: the parameters' floating dtype; the stored tensors are cast to it. float32 when None.

        Returns:
            The model, in eval mode, with `lm_head.weight` the embedding matrix when
            `config.tie_embeddings`.

        Raises:
            FileNotFoundError: nothing exists at `path`, or it lacks config.json or any weights file.
            NotADirectoryError: `path` is a file (such as the checkpoint's config.json).
            ValueError: config.json is not valid JSON, not a JSON object, misses a field or holds a
                value the config rejects; a weights file cannot be read (truncated or corrupt); the
                keys or shapes do not match the config; or a released Based config is given to
                `Transformer`. Each message names the file or the keys.
            TypeError: a checkpoint entry (other than the ignored ones) is not a tensor.
        """
        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path, *, safe_serialization: bool = True) -> None:
        """Write this model's config and weights into the directory `path`, for `from_pretrained`.

        Creates `path` (and its parents) if needed and writes, replacing files of the same names:
        `config.json`, the config's fields plus `model_type` (`self.config.to_dict()`), and the state dict
        as `model.safetensors` (or `pytorch_model.bin` with `safe_serialization=False`): every parameter
        in its current dtype and shape, copied to the CPU and made contiguous. A tied `lm_head.weight`
        is left out (it is the embedding matrix; `from_pretrained` ties it back). Other files in `path`
        are left alone; `from_pretrained` reads every `*.safetensors` there in preference to
        `pytorch_model.bin`, so write a `.bin` checkpoint into a directory without `.safetensors` files.
        Nothing is uploaded.

        Args:
            path: the directory (str or `os.PathLike`).
            safe_serialization: write safetensors (True, the default) or a `torch.save` pickle.

        Returns:
            None.

        Raises:
            OSError: `path` cannot be created or written (e.g. `FileExistsError` when it is a file).
        """
        save_pretrained(self, path, safe_serialization=safe_serialization)
