"""Sweep the linear-attention kernels' launch shape (chunk, value block, warps) on this GPU.

    python benchmarks/tune_linear_attention.py

Prints forward and forward+backward medians for each (chunk BT, value block BV, num_warps) at B=8, H=16,
d=16, dv=64, bf16; the chosen values live in `based/ops/linear_attention/triton_common.py`.
"""
from __future__ import annotations

import sys

import torch
import triton.testing
from _common import banner, environment, format_table

from based.ops import linear_attention
from based.ops.linear_attention import triton_common

# (BT, BV, num_warps) to try. num_warps=8 is left out: Triton 3.6 miscompiles _dq_kernel with it
# (compute-sanitizer: out-of-bounds shared-memory reads at BT=64, BV=64; H200, 2026-11-26).
SHAPES = [(16, 16, 4), (16, 32, 4), (32, 16, 4), (32, 32, 4), (64, 16, 4), (16, 64, 4)]


def main() -> int:
    if not torch.cuda.is_available():
        print("tune_linear_attention.py needs a CUDA device.", file=sys.stderr)
        return 1
    print(banner(environment(torch.device("cuda"))))
    B, H, d, dv = 8, 16, 16, 64
    rows = []
    for T in (1024, 4096, 16384):
        q, k = (torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        v = torch.randn(B, T, H, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(v)
        reference = None
        for chunk, block_v, warps in SHAPES:
            triton_common.CHUNK, triton_common.BLOCK_V, triton_common.NUM_WARPS = chunk, block_v, warps
            out = linear_attention(q, k, v)
            reference = out.float() if reference is None else reference
            err = ((out.float() - reference).norm() / reference.norm()).item()
            fwd = triton.testing.do_bench(lambda: linear_attention(q, k, v), return_mode="median")
            both = triton.testing.do_bench(lambda: linear_attention(q, k, v).backward(grad), return_mode="median")
            rows.append({"T": T, "BT": chunk, "BV": block_v, "warps": warps, "fwd ms": f"{fwd:.3f}", "fwd+bwd ms": f"{both:.3f}",
                         "diff vs first": f"{err:.1e}"})
            print(rows[-1], flush=True)
    print("\n".join(format_table(rows, list(rows[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
