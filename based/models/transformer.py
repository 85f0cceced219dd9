"""`Transformer`: the Transformer++ baseline (RoPE, SwiGLU, RMSNorm) with a static KV cache.

Attention runs through FlashAttention-2 (`flash_attn`) when it is installed and the input is fp16/bf16
on a GPU, else through PyTorch's `scaled_dot_product_attention`, which picks its own flash kernel
where it can. `attention_backend_name(device, dtype)` says which one a model will use, so benchmark
tables can name the baseline they measured.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from based.models.config import TransformerConfig
from based.models.lm import CausalLM
from based.nn.attention import RotaryAttention

HALF_DTYPES = (torch.float16, torch.bfloat16)


# Looked up once at import: torch.compile cannot trace an import statement that fails (a graph break, and an
# error under fullgraph=True), which a lookup inside the forward would be without flash_attn installed.
try:
    import flash_attn as _flash_attn_module
except ImportError:
    _flash_attn_module = None


def _flash_attn():
    """The `flash_attn` module, or None when it is not installed."""
    return _flash_attn_module


def attention_backend_name(device, dtype: torch.dtype) -> str:
    """The attention kernel `Transformer` runs for tensors of this device and dtype.

    "flash_attn": FlashAttention-2 from the `flash_attn` package (prefill and decode);
    "SDPA-flash": PyTorch's built-in FlashAttention-2 kernel: SDPA's flash backend for prompts, and for
                  decode steps the same kernel called in its variable-length form (`_flash_decode`) when this
                  torch has it with the expected signature (`flash_decode_available`), else SDPA over the
                  whole static cache with the unwritten rows masked out;
    "math":       anything else (CPU, fp32, or a GPU without SDPA's flash kernel).
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return "math"
    if _flash_attn() is not None:
        return "flash_attn"
    if torch.backends.cuda.flash_sdp_enabled() and torch.cuda.get_device_capability(device)[0] >= 8:
        return "SDPA-flash"
    return "math"


class KVCache(NamedTuple):
    """Static keys and values of one attention layer.

    k, v:     `[B, max_seqlen, H, D]` in the model's dtype, position p in row p.
    position: 0-dim int64 tensor on the device, the position of the next token (advanced in place).
    advance:  whether the layer advances `position` itself (see `based.nn.SlidingWindowCache`).
    """

    k: torch.Tensor
    v: torch.Tensor
    position: torch.Tensor
    advance: bool = True

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]


class CausalSelfAttention(RotaryAttention):
    """Multi-head causal attention: a `RotaryAttention` over every earlier token, decoding into a static KV cache
    of `max_seqlen` positions."""

    cache_type = KVCache

    def cache_tensors(self, batch_size: int, max_seqlen: int | None, device, dtype) -> tuple[torch.Tensor, ...]:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"max_seqlen must be an int >= 1 (the KV cache's length), got {max_seqlen!r}")
        shape = (batch_size, max_seqlen, self.num_heads, self.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def attend(self, q, k, v):
        return causal_attention(q, k, v)

    def attend_cached(self, q, k, v, cache: KVCache):
        return cached_attention(q, k.to(cache.k.dtype), v.to(cache.v.dtype), cache)


def _use_flash_attn(q: torch.Tensor) -> bool:
    """`attention_backend_name(...) == "flash_attn"` without the device queries, which torch.compile need not trace."""
    return _flash_attn_module is not None and q.is_cuda and q.dtype in HALF_DTYPES


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q `[B, Tq, H, D]` over k, v `[B, Tk, H, D]`, Tq <= Tk, causal with the
    queries aligned to the last keys (query i sits at key position i + Tk - Tq)."""
    if _use_flash_attn(q):
        return _flash_attn().flash_attn_func(q, k, v, causal=True)
    Tq, Tk = q.shape[1], k.shape[1]
    # SDPA's is_causal aligns the top-left corner; a chunk after cached keys needs an explicit mask.
    mask = None if Tq == Tk else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None)
    return o.transpose(1, 2)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Write the new k, v at `cache.position ..` and attend q over everything cached up to them."""
    B, T = q.shape[:2]
    if _use_flash_attn(q):
        # Appends k, v at cache_seqlens in place and attends causally, bottom-right aligned; reads the
        # position on the device only, so it is graph-capturable for any T.
        seqlens = cache.position.to(torch.int32).expand(B).contiguous()
        return _flash_attn().flash_attn_with_kvcache(q, cache.k, cache.v, k=k, v=v, cache_seqlens=seqlens,
                                                     causal=True)
    if T == 1:
        # Decode step: write row `position`, then attend over the rows written so far. No host read of the
        # position, so the step can be captured in a CUDA graph.
        cache.k.index_copy_(1, cache.position.view(1), k)
        cache.v.index_copy_(1, cache.position.view(1), v)
        if attention_backend_name(q.device, q.dtype) == "SDPA-flash" and flash_decode_available():
            return _flash_decode(q, cache)
        # Elsewhere (CPU, fp32, a torch whose private flash entry point differs): the public SDPA over the whole
        # static cache with the unwritten rows masked out.
        visible = (torch.arange(cache.k.shape[1], device=q.device) <= cache.position).view(1, 1, 1, -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k.transpose(1, 2), cache.v.transpose(1, 2),
                                           attn_mask=visible)
        return o.transpose(1, 2)
    start = int(cache.position)
    if start + T > cache.k.shape[1]:
        raise ValueError(f"KV cache holds {start} of {cache.k.shape[1]} positions; {T} more do not fit")
    cache.k[:, start:start + T] = k
    cache.v[:, start:start + T] = v
    return causal_attention(q, cache.k[:, :start + T], cache.v[:, :start + T])


# The leading positional arguments `_flash_decode` passes, in order, and the keyword it needs: the schema of
# torch 2.5 and later. The op is private, so its signature is checked before it is called.
_FLASH_FORWARD_POSITIONAL = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                             "is_causal", "return_debug_mask")


@functools.cache
def flash_decode_available() -> bool:
    """Whether this torch has `aten::_flash_attention_forward` with the arguments `_flash_decode` passes."""
    return flash_forward_schema_matches(getattr(torch.ops.aten, "_flash_attention_forward", None))


def flash_forward_schema_matches(op) -> bool:
    """Whether `op` (an `aten::_flash_attention_forward` overload packet, or None) takes `_FLASH_FORWARD_POSITIONAL`
    positionally and `seqused_k` by keyword, returning the attention output first."""
    schema = getattr(getattr(op, "default", None), "_schema", None)
    if schema is None:
        return False
    arguments = [(a.name, a.kwarg_only) for a in schema.arguments]
    positional = tuple(name for name, kwarg_only in arguments if not kwarg_only)
    return (positional == _FLASH_FORWARD_POSITIONAL and ("seqused_k", True) in arguments
            and bool(schema.returns) and schema.returns[0].name == "output")


def _flash_decode(q: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One query per sequence over the first `position + 1` rows of its static cache, through PyTorch's
    FlashAttention-2 kernel in variable-length form: the cache is B packed sequences of max_seqlen keys and
    `seqused_k` (on the device) says how many of each are used, so the step reads only the written rows
    and keeps static shapes (CUDA-graph safe). SDPA's own entry point would need a mask over the whole
    cache, which sends it to a slower kernel that reads every row."""
    B, _, H, D = q.shape
    L = cache.k.shape[1]
    starts = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    used = (cache.position + 1).to(torch.int32).expand(B).contiguous()
    o = torch.ops.aten._flash_attention_forward(
        q.reshape(B, H, D), cache.k.view(B * L, H, D), cache.v.view(B * L, H, D), starts, starts * L, 1, L,
        0.0, False, False, seqused_k=used)[0]
    return o.view(B, 1, H, D)


class Transformer(CausalLM):
    """Transformer++ (`TransformerConfig`); see `CausalLM` for the calling convention.

    Same skeleton and state-dict layout as `BasedLM`, with `CausalSelfAttention` (`mixer.Wqkv`,
    `mixer.out_proj`) in every layer. Decoding keeps a static KV cache of `max_seqlen` positions: a call
    that would pass them raises ValueError.
    """

    config_class = TransformerConfig
    bounded_cache = True  # the KV cache holds max_seqlen positions

    def build_mixer(self, layer_idx: int, *, device=None, dtype=None) -> nn.Module:
        return CausalSelfAttention(self.config.d_model, num_heads=self.config.n_heads,
                                   rotary_base=self.config.rotary_base, device=device, dtype=dtype)
