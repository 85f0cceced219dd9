"""Conversion between the public state layout and the kernels' raw sums.

Public (`LinearAttentionState`): E = 1 + d + d(d+1)/2 rows, the sums of phi(k) (v) with the symmetric
feature map of `feature_map/reference.py`.
Raw (Triton kernels): F = 1 + DP + DP*DP rows, unscaled sums of 1, k[a], k[a]*k[b] (times v), with d
zero-padded to DP; see `triton_fwd.py`. Both are linear in each other, so one [E, F] matrix converts
each way and autograd carries gradients through it.
"""
from __future__ import annotations

import functools
import math

import torch

from based.ops.feature_map.reference import feature_dim_of


@functools.lru_cache(maxsize=None)
def _public_from_raw_matrix(d: int, dp: int, device: torch.device) -> torch.Tensor:
    """M [E, F] with public = M @ raw, for raw sums that are symmetric in (a, b)."""
    E, F = feature_dim_of(d), 1 + dp + dp * dp
    m = torch.zeros(E, F, dtype=torch.float64)
    m[0, 0] = 1.0
    idx = torch.arange(d)
    m[1 + idx, 1 + idx] = d**-0.25
    rows, cols = torch.triu_indices(d, d)
    pairs = torch.arange(rows.numel())
    scale = torch.where(rows == cols, 1 / math.sqrt(2 * d), 1 / math.sqrt(d)).double()
    m[1 + d + pairs, 1 + dp + rows * dp + cols] = scale
    return m.to(device)


@functools.lru_cache(maxsize=None)
def _raw_from_public_matrix(d: int, dp: int, device: torch.device) -> torch.Tensor:
    """N [F, E] with raw = N @ public: both (a, b) and (b, a) rows get the pair's sum, padding stays 0."""
    E, F = feature_dim_of(d), 1 + dp + dp * dp
    n = torch.zeros(F, E, dtype=torch.float64)
    n[0, 0] = 1.0
    idx = torch.arange(d)
    n[1 + idx, 1 + idx] = d**0.25
    rows, cols = torch.triu_indices(d, d)
    pairs = torch.arange(rows.numel())
    scale = torch.where(rows == cols, math.sqrt(2 * d), math.sqrt(d)).double()
    n[1 + dp + rows * dp + cols, 1 + d + pairs] = scale
    n[1 + dp + cols * dp + rows, 1 + d + pairs] = scale
    return n.to(device)


def public_from_raw(kv_raw: torch.Tensor, z_raw: torch.Tensor, d: int, dp: int):
    """([B, H, F, DV], [B, H, F]) raw -> ([B, H, E, DV], [B, H, E]) public, float32."""
    m = _public_from_raw_matrix(d, dp, kv_raw.device).float()
    return torch.einsum("ef,bhfv->bhev", m, kv_raw), torch.einsum("ef,bhf->bhe", m, z_raw)


def raw_from_public(kv: torch.Tensor, ksum: torch.Tensor, d: int, dp: int):
    """([B, H, E, DV], [B, H, E]) public -> raw ([B, H, F, DV], [B, H, F]), float32."""
    n = _raw_from_public_matrix(d, dp, kv.device).float()
    return (torch.einsum("fe,bhev->bhfv", n, kv.float()).contiguous(),
            torch.einsum("fe,bhe->bhf", n, ksum.float()).contiguous())
