"""Taylor linear attention in plain PyTorch: the chunked form, O(T) memory.

The sequence is cut into chunks of C tokens. Inside a chunk the scores a_ij = 1 + s + s*s/2
(s = q_i.k_j / sqrt(d)) are computed directly, a C x C block per chunk. Across chunks the contribution
of earlier tokens goes through the feature-space state sum_j phi(k_j) outer v_j, summed chunk by chunk.
Nothing of size T x T is ever formed. Everything runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from based.ops.feature_map.reference import taylor_feature_map_torch
from based.ops.linear_attention.state import LinearAttentionState, accumulation_dtype

CHUNK_SIZE = 64


def linear_attention_torch(q, k, v, causal: bool, normalize: bool, eps: float,
                           initial_state: LinearAttentionState | None, return_state: bool,
                           chunk_size: int = CHUNK_SIZE):
    B, T, H, d = q.shape
    acc = accumulation_dtype(v.dtype)
    # [B, T, H, x] -> [B, H, N, C, x], zero-padded to whole chunks.
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T

    def chunks(x):
        x = F.pad(x.to(acc).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, H, n_chunks, chunk_size, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    is_key = (torch.arange(n_chunks * chunk_size, device=q.device) < T).reshape(n_chunks, chunk_size)
    phi_q = taylor_feature_map_torch(qc)
    # Padded keys must not enter the sums: phi(0) = [1, 0, ...] is not zero.
    phi_k = taylor_feature_map_torch(kc) * is_key[..., None].to(acc)

    kv_chunk = phi_k.transpose(-1, -2) @ vc  # [B, H, N, E, dv]
    ksum_chunk = phi_k.sum(-2)  # [B, H, N, E]
    kv_init = ksum_init = 0.0
    if initial_state is not None:
        kv_init = initial_state.kv.to(acc)[:, :, None]
        ksum_init = initial_state.ksum.to(acc)[:, :, None]

    if causal:
        # State before each chunk: the initial state plus all earlier chunks (exclusive prefix sum).
        kv_before = _exclusive_cumsum(kv_chunk) + kv_init
        ksum_before = _exclusive_cumsum(ksum_chunk) + ksum_init
        s = (qc @ kc.transpose(-1, -2)) * d**-0.5
        causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        a = torch.where(causal_mask, 1 + s + 0.5 * s * s, 0.0)
        num = a @ vc + phi_q @ kv_before
        den = a.sum(-1) + (phi_q * ksum_before[..., None, :]).sum(-1)
    else:
        kv_all = kv_chunk.sum(2, keepdim=True) + kv_init
        ksum_all = ksum_chunk.sum(2, keepdim=True) + ksum_init
        num = phi_q @ kv_all
        den = (phi_q * ksum_all[..., None, :]).sum(-1)

    o = num / (den[..., None] + eps) if normalize else num
    o = o.reshape(B, H, n_chunks * chunk_size, -1)[:, :, :T].transpose(1, 2).to(v.dtype)
    if not return_state:
        return o
    final = LinearAttentionState(kv=kv_chunk.sum(2) + _squeeze_chunk(kv_init),
                                 ksum=ksum_chunk.sum(2) + _squeeze_chunk(ksum_init))
    return o, final


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Prefix sums over the chunk axis (dim 2) that exclude the chunk itself."""
    return F.pad(x.cumsum(2), (0, 0) * (x.dim() - 3) + (1, -1))


def _squeeze_chunk(x):
    return x.squeeze(2) if isinstance(x, torch.Tensor) else x


def linear_attention_step_torch(q, k, v, state: LinearAttentionState, normalize: bool, eps: float):
    acc = state.kv.dtype
    phi_q = taylor_feature_map_torch(q.to(acc))  # [B, H, E]
    phi_k = taylor_feature_map_torch(k.to(acc))
    state.kv.add_(phi_k[..., :, None] * v.to(acc)[..., None, :])
    state.ksum.add_(phi_k)
    num = (phi_q[..., None, :] @ state.kv).squeeze(-2)
    if normalize:
        num = num / ((phi_q * state.ksum).sum(-1, keepdim=True) + eps)
    return num.to(v.dtype)
