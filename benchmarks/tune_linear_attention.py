"""Sweep the linear-attention kernels' launch shape (value block BV, warps) on this GPU.

    python benchmarks/tune_linear_attention.py

Prints forward and forward+backward medians for each (BV, num_warps) at B=8, H=16, d=16, dv=64, bf16;
the chosen values live in `based/ops/linear_attention/triton_common.py` (BLOCK_V, NUM_WARPS).
"""
from __future__ import annotations

import itertools
import sys

import torch
import triton.testing
from _common import banner, environment, format_table

from based.ops import linear_attention
from based.ops.linear_attention import triton_common


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
        for block_v, warps in itertools.product((16, 32, 64), (4, 8)):
            triton_common.BLOCK_V, triton_common.NUM_WARPS = block_v, warps
            out = linear_attention(q, k, v)
            reference = out.float() if reference is None else reference
            err = ((out.float() - reference).norm() / reference.norm()).item()
            fwd = triton.testing.do_bench(lambda: linear_attention(q, k, v), return_mode="median")
            both = triton.testing.do_bench(lambda: linear_attention(q, k, v).backward(grad), return_mode="median")
            rows.append({"T": T, "BV": block_v, "warps": warps, "fwd ms": f"{fwd:.3f}", "fwd+bwd ms": f"{both:.3f}",
                         "diff vs first": f"{err:.1e}"})
            print(rows[-1], flush=True)
    print("\n".join(format_table(rows, list(rows[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
