"""Sliding-window softmax attention in plain PyTorch: blocked, O(T * window) memory.

Query i sits at key position p = i + Tk - Tq (bottom-right aligned, as in flash-attn) and attends to
keys p - window < j <= p. The queries are cut into blocks of C rows. A block needs only the
L = C + window - 1 keys that end at its last query, so the scores are C x L per block and nothing of
size Tq x Tk is ever formed. All blocks run at once: the keys are padded at the front so that block b's
span starts at padded index b*C, and `unfold` views the overlapping spans with stride C. Inside a span,
query row r sees columns r .. r + window - 1, the same band for every block.
Everything runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from based.ops.linear_attention.state import accumulation_dtype
from based.ops.sliding_window.cache import WindowCache, write_ring

BLOCK_SIZE = 64


def sliding_window_attention_torch(q, k, v, window: int, scale: float, block_size: int = BLOCK_SIZE):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv  # query heads per kv head; head h reads kv head h // G
    acc = accumulation_dtype(q.dtype)
    # A window longer than the keys sees all of them; clamping it bounds each span by Tk.
    window = min(window, Tk)
    C = min(block_size, Tq)
    n_blocks = -(-Tq // C)
    L = C + window - 1

    # Block b's first query sits at key position b*C + Tk - Tq, so its span starts `window - 1` earlier.
    # Pad the front by that offset (a negative pad trims keys no query can see) and the back so that the
    # last span is complete: n_blocks*C + window - 1 keys in all.
    front = window - 1 - (Tk - Tq)
    back = n_blocks * C - Tq
    key_pos = torch.arange(-front, Tk + back, device=q.device)
    key_valid = ((key_pos >= 0) & (key_pos < Tk)).unfold(0, L, C)  # [n, L]
    k_spans = F.pad(k.to(acc).transpose(1, 2), (0, 0, front, back)).unfold(2, L, C)  # [B, Hkv, n, D, L]
    v_spans = F.pad(v.to(acc).transpose(1, 2), (0, 0, front, back)).unfold(2, L, C).transpose(-1, -2)

    # [B, Tq, H, D] -> [B, Hkv, n, G*C, D]: the G query heads of a kv head share its key spans, so they
    # are stacked as rows of one matmul instead of broadcasting (and copying) the spans G times.
    q_blocks = F.pad(q.to(acc), (0, 0, 0, 0, 0, back)).reshape(B, n_blocks, C, Hkv, G, D)
    q_blocks = q_blocks.permute(0, 3, 1, 4, 2, 5).reshape(B, Hkv, n_blocks, G * C, D)
    scores = (q_blocks @ k_spans * scale).view(B, Hkv, n_blocks, G, C, L)

    row = torch.arange(C, device=q.device)[:, None]
    col = torch.arange(L, device=q.device)[None, :]
    band = (col >= row) & (col < row + window)  # [C, L]
    probs = masked_softmax(scores, band & key_valid[:, None, None, :])  # mask [n, 1, C, L]

    o = probs.view(B, Hkv, n_blocks, G * C, L) @ v_spans  # [B, Hkv, n, G*C, Dv]
    o = o.view(B, Hkv, n_blocks, G, C, Dv).permute(0, 2, 4, 1, 3, 5).reshape(B, n_blocks * C, H, Dv)
    return o[:, :Tq].to(q.dtype)


def sliding_window_attention_step_torch(q, k, v, cache: WindowCache, pos, scale: float):
    write_ring(cache, k[:, None], v[:, None], pos)
    B, H, D = q.shape
    W, Hkv = cache.k.shape[1], cache.k.shape[2]
    q_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q = q.to(acc).reshape(B, Hkv, H // Hkv, D)
    scores = torch.einsum("bhgd,bwhd->bhgw", q, cache.k.to(acc)) * scale
    # The slots hold positions pos-W+1..pos once the ring has filled (pos >= W-1); before that only
    # slots 0..pos are written. `arange <= pos` says both, and is computed on the device from a tensor pos.
    filled = torch.arange(W, device=q.device) <= pos
    o = torch.einsum("bhgw,bwhd->bhgd", masked_softmax(scores, filled), cache.v.to(acc))
    return o.reshape(B, H, -1).to(q_dtype)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the allowed entries.

    Masked entries get the most negative finite value, not -inf: padding query rows, which see no key
    and are dropped afterwards, then come out uniform instead of NaN, and no NaN reaches the gradients.
    """
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
