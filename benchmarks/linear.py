"""Batch-1 projections of Based-1.3B: the fused Triton GEMV (`based.ops.linear`) against cuBLAS plus the
elementwise ops it replaces, with the weights streamed from HBM.

    python benchmarks/linear.py              # the configured launch shapes
    python benchmarks/linear.py --sweep      # every candidate (rows per program, K block, warps)

A GEMV re-reading one matrix finds it in L2 (50 MB on an H100/H200 holds any of these), which overstates the
bandwidth a decode step sees. So each timing cycles through enough copies of the weight to exceed L2 three
times over, all captured in one CUDA graph, and divides by the number of copies. "% of copy" is weight bytes
per second over the device-to-device copy bandwidth measured in the same run (a copy moves each byte twice,
a GEMV once, so 100% is not the ceiling). On Hopper the captured GEMVs are chained (programmatic dependent
launch, as in a decode graph): each loads its first weight tile while the previous one finishes.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
from _common import banner, copy_bandwidth, environment, format_table, gpu_missing, graph_ms

from based.ops import linear
from based.ops.linear import triton_gemv

# (name, rows, in_features, bias, gated, residual): every projection of a Based-1.3B decode step.
SHAPES = [
    ("BaseConv in_proj", 7168, 1792, True, False, False),
    ("BaseConv out_proj", 1792, 3584, True, False, False),
    ("MLP fc1 (gated)", 7168, 1792, False, True, False),
    ("MLP fc2 (+ residual)", 1792, 3584, False, False, True),
    ("linear attn proj_q / proj_k", 256, 1792, True, False, False),
    ("linear attn proj_v / out_proj", 1792, 1792, True, False, False),
    ("sliding window Wqkv", 5376, 1792, False, False, False),
    ("lm_head", 50264, 1792, False, False, False),
]
# (rows per program, K per iteration, warps), at most 16 bf16 of a tile per thread and load
SWEEP = [c for c in itertools.product([1, 2, 4, 8, 16], [256, 512, 1024], [4, 8]) if c[0] * c[1] <= 512 * c[2]]


def projection_inputs(rows, K, bias, gated, residual) -> dict:
    """`linear`'s arguments for one projection, the weight as enough copies to exceed L2 three times over."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    copies = max(2, math.ceil(3 * torch.cuda.get_device_properties(device).L2_cache_size / (rows * K * 2)))
    return dict(weights=[torch.randn(rows, K, device=device, dtype=dtype) / K**0.5 for _ in range(copies)],
                bias=torch.randn(rows, device=device, dtype=dtype) if bias else None,
                x=torch.randn(1, 1, K, device=device, dtype=dtype),
                residual=torch.randn(1, 1, rows // 2 if gated else rows, device=device) if residual else None,
                gated=gated)


def time_projection(inputs: dict, backend: str) -> float:
    """ms per call with the weight cold in L2: one graph calls `linear` once on each copy."""
    weights, x = inputs["weights"], inputs["x"]

    def run():
        for w in weights:
            linear(x, w, inputs["bias"], residual=inputs["residual"], gated=inputs["gated"], backend=backend)

    return graph_ms(run) / len(weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time every launch shape in SWEEP for each projection")
    args = parser.parse_args(argv)
    if gpu_missing("linear.py"):
        return 1
    print(banner(environment(torch.device("cuda"))))
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; bf16, x one row")
    table = []
    for name, rows, K, bias, gated, residual in SHAPES:
        floor_us = 1e6 * rows * K * 2 / bandwidth
        inputs = projection_inputs(rows, K, bias, gated, residual)  # shared by cuBLAS and every config
        cublas = 1e3 * time_projection(inputs, "torch")
        configs = SWEEP if args.sweep else [None]
        for config in configs:
            if config is not None:
                triton_gemv.TALL = triton_gemv.SHORT = config
            ours = 1e3 * time_projection(inputs, "triton")
            table.append({"projection": name, "rows x K": f"{rows} x {K}", "config": config or "default",
                          "copy-floor us": f"{floor_us:.2f}", "cuBLAS (+ epilogue ops) us": f"{cublas:.2f}",
                          "Triton us": f"{ours:.2f}", "Triton % of copy": f"{100 * floor_us / ours:.0f}",
                          "cuBLAS / Triton": f"{cublas / ours:.2f}"})
            print(table[-1], flush=True)
    print("\n".join(format_table(table, list(table[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
