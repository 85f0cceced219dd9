"""Batch-1 projections of Based-1.3B: the fused Triton GEMV (`based.ops.linear` and its relatives) against cuBLAS plus the
ops it replaces (the RMSNorm before it, the gate and the residual add after it), with the weights streamed
from HBM.

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

from based.ops import linear, linear_gated_conv1d_step, stacked_linear
from based.ops.linear import triton_gemv

# (name, rows, in_features, epilogue): every projection of a Based-1.3B batch-1 decode step with what the blocks
# fuse into it: "norm" before (x is then the fp32 residual stream), "bias", "gated", "conv" (BaseConv's conv
# gate), "residual" after; rows as a tuple: one stacked launch over several weights (linear attention's q, k, v).
SHAPES = [
    ("BaseConv in_proj (+ norm, conv gate)", 7168, 1792, {"norm", "bias", "conv"}),
    ("BaseConv out_proj (+ residual)", 1792, 3584, {"bias", "residual"}),
    ("MLP fc1 (+ norm, gated)", 7168, 1792, {"norm", "gated"}),
    ("MLP fc2 (+ residual)", 1792, 3584, {"residual"}),
    ("linear attn q, k, v stacked (+ norm)", (256, 256, 1792), 1792, {"norm"}),
    ("linear attn out_proj (+ residual)", 1792, 1792, {"residual"}),
    ("sliding window Wqkv (+ norm)", 5376, 1792, {"norm"}),
    ("lm_head (+ norm)", 50264, 1792, {"norm"}),
]
# (rows per program, columns loaded before the wait, K per later iteration, warps), at most 64 bf16 of the
# preloaded tile per thread
SWEEP = [(rows, pre, 256, warps) for rows, pre, warps in itertools.product([1, 2, 4, 8, 16], [256, 1024, 4096], [2, 4, 8])
         if rows * pre <= 2048 * warps]


def projection_inputs(rows, K, epilogue) -> tuple[list, dict]:
    """(weights, the other arguments) of one projection: its weights (a list of lists for a stacked launch) as
    enough copies to exceed L2 three times over."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    stacked = rows if isinstance(rows, tuple) else (rows,)
    total = sum(stacked)
    copies = max(2, math.ceil(3 * torch.cuda.get_device_properties(device).L2_cache_size / (total * K * 2)))
    weights = [[torch.randn(n, K, device=device, dtype=dtype) / K**0.5 for n in stacked] for _ in range(copies)]
    out_features = total // 2 if epilogue & {"gated", "conv"} else total
    kwargs = dict(x=torch.randn(1, 1, K, device=device, dtype=torch.float32 if "norm" in epilogue else dtype))
    if "norm" in epilogue:
        kwargs["norm_weight"] = torch.ones(K, device=device, dtype=dtype)
    if "bias" in epilogue:
        kwargs["bias"] = torch.randn(total, device=device, dtype=dtype)
    if "gated" in epilogue:
        kwargs["gated"] = True
    if "conv" in epilogue:
        kwargs.update(x=kwargs["x"][0], bias=kwargs.get("bias"))  # a [B, K] decode-step input
        kwargs["conv_state"] = torch.zeros(1, out_features, 3, device=device)
        kwargs["conv_weight"] = torch.randn(out_features, 3, device=device, dtype=dtype)
    if "residual" in epilogue:
        kwargs["residual"] = torch.randn(1, 1, out_features, device=device)
    return weights, kwargs


def time_projection(weights: list, kwargs: dict, backend: str) -> float:
    """ms per call with the weights cold in L2: one graph calls the op once on each copy."""

    def run():
        for copy in weights:
            if len(copy) > 1:
                stacked_linear(weights=copy, backend=backend, **kwargs)
            elif "conv_state" in kwargs:
                linear_gated_conv1d_step(weight=copy[0], backend=backend, **kwargs)
            else:
                linear(weight=copy[0], backend=backend, **kwargs)

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
    for name, rows, K, epilogue in SHAPES:
        floor_us = 1e6 * sum(rows if isinstance(rows, tuple) else (rows,)) * K * 2 / bandwidth
        weights, kwargs = projection_inputs(rows, K, epilogue)  # shared by cuBLAS and every config
        cublas = 1e3 * time_projection(weights, kwargs, "torch")
        configs = SWEEP if args.sweep else [None]
        for config in configs:
            if config is not None:
                triton_gemv.TALL = triton_gemv.SHORT = config
            ours = 1e3 * time_projection(weights, kwargs, "triton")
            shape = f"{'+'.join(map(str, rows)) if isinstance(rows, tuple) else rows} x {K}"
            table.append({"projection": name, "rows x K": shape, "config": config or "default",
                          "copy-floor us": f"{floor_us:.2f}", "cuBLAS (+ norm, epilogue ops) us": f"{cublas:.2f}",
                          "Triton us": f"{ours:.2f}", "Triton % of copy": f"{100 * floor_us / ours:.0f}",
                          "cuBLAS / Triton": f"{cublas / ours:.2f}"})
            print(table[-1], flush=True)
    print("\n".join(format_table(table, list(table[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
