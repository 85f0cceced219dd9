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
from torch._subclasses.fake_tensor import is_fake

from based.ops.feature_map.reference import feature_dim_of


def _correspondence(d: int, dp: int):
    """Each public feature e, its raw row (a*DP + b with a <= b for second order), the mirrored raw row
    (b*DP + a), and the factor with public = factor * raw (raw sums are symmetric in (a, b))."""
    rows, cols = torch.triu_indices(d, d)
    first = torch.arange(d)
    public = torch.cat([torch.zeros(1, dtype=torch.long), 1 + first, 1 + d + torch.arange(rows.numel())])
    raw = torch.cat([torch.zeros(1, dtype=torch.long), 1 + first, 1 + dp + rows * dp + cols])
    mirror = torch.cat([torch.zeros(1, dtype=torch.long), 1 + first, 1 + dp + cols * dp + rows])
    factor = torch.cat([torch.ones(1), torch.full((d,), d**-0.25),
                        torch.where(rows == cols, 1 / math.sqrt(2 * d), 1 / math.sqrt(d))]).double()
    return public, raw, mirror, factor


@functools.lru_cache(maxsize=None)
def _public_from_raw_matrix(d: int, dp: int, device: torch.device) -> torch.Tensor:
    """M [E, F] with public = M @ raw."""
    public, raw, _, factor = _correspondence(d, dp)
    m = torch.zeros(feature_dim_of(d), 1 + dp + dp * dp, dtype=torch.float64)
    m[public, raw] = factor
    return m.to(device)


@functools.lru_cache(maxsize=None)
def _raw_from_public_matrix(d: int, dp: int, device: torch.device) -> torch.Tensor:
    """N [F, E] with raw = N @ public: both (a, b) and (b, a) rows get the pair's sum, padding stays 0."""
    public, raw, mirror, factor = _correspondence(d, dp)
    n = torch.zeros(1 + dp + dp * dp, feature_dim_of(d), dtype=torch.float64)
    n[raw, public] = 1 / factor
    n[mirror, public] = 1 / factor
    return n.to(device)


def _matrix(build, d: int, dp: int, like: torch.Tensor) -> torch.Tensor:
    """`build(d, dp, device)` in float32, from its cache in eager mode; made afresh while `like` is a fake tensor
    (torch.compile / AOT tracing of an autograd formula), where a cached real tensor may not enter the graph."""
    if is_fake(like):
        return build.__wrapped__(d, dp, like.device).float()
    return build(d, dp, like.device).float()


def public_from_raw(kv_raw: torch.Tensor, z_raw: torch.Tensor, d: int, dp: int):
    """([B, H, F, DV], [B, H, F]) raw -> ([B, H, E, DV], [B, H, E]) public, float32."""
    m = _matrix(_public_from_raw_matrix, d, dp, kv_raw)
    return torch.einsum("ef,bhfv->bhev", m, kv_raw), torch.einsum("ef,bhf->bhe", m, z_raw)


def raw_from_public(kv: torch.Tensor, ksum: torch.Tensor, d: int, dp: int):
    """([B, H, E, DV], [B, H, E]) public -> raw ([B, H, F, DV], [B, H, F]), float32."""
    n = _matrix(_raw_from_public_matrix, d, dp, kv)
    return (torch.einsum("fe,bhev->bhfv", n, kv.float()).contiguous(),
            torch.einsum("fe,bhe->bhf", n, ksum.float()).contiguous())
