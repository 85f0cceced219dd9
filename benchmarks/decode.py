"""Decode step of one linear-attention layer: the fused kernels against the naive PyTorch step.

    python benchmarks/decode.py                       # B = 1..1024, H=16, d=16, dv 64 and 112, bf16 inputs
    python benchmarks/decode.py --batch-sizes 256 --value-dims 64 --out decode.json

One step reads and writes the fp32 state (kv [B, H, 153, dv] and ksum [B, H, 153]) once; that is the floor,
at the device-to-device copy bandwidth measured in the same run. Every step is replayed from a CUDA graph
(`triton.testing.do_bench_cudagraph`), as generation runs it, so host launch overhead is not what is timed.
"GB/s" counts the state bytes read and written plus q, k, v and o, over the step's time.
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    DTYPES, banner, check_out_path, copy_bandwidth, environment, format_table, gpu_missing, graph_ms, write_results,
)

from based.ops import LinearAttentionState, linear_attention_step
from based.ops._backend import cuda_extension_available


def step_bytes(B: int, H: int, d: int, dv: int, E: int, input_bytes: int) -> tuple[int, int]:
    """(state bytes read + written, all bytes moved) by one step."""
    state = 2 * 4 * B * H * (E * dv + E)
    return state, state + input_bytes * B * H * (2 * d + 2 * dv)


def time_step(backend: str, B: int, H: int, d: int, dv: int, dtype) -> float:
    state = LinearAttentionState.zeros(B, H, d, dv, device="cuda")
    q, k = (torch.randn(B, H, d, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, dv, device="cuda", dtype=dtype)

    return graph_ms(lambda: linear_attention_step(q, k, v, state, backend=backend))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--value-dims", type=int, nargs="+", default=[64, 112])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the rows to a .json or .csv file")
    args = parser.parse_args(argv)
    check_out_path(args.out)
    if gpu_missing("decode.py"):
        return 1
    dtype, H, d = DTYPES[args.dtype], args.heads, args.feature_dim
    env = environment(torch.device("cuda"))
    bandwidth = copy_bandwidth()
    backends = ["triton"] + (["cuda"] if cuda_extension_available() else [])
    print(banner(env))
    print(f"H={H} d={d} {args.dtype} inputs, fp32 state; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"fused backends: {', '.join(backends)}" + ("" if "cuda" in backends else " (based._C not built)"))
    E = 1 + d + d * (d + 1) // 2
    rows = []
    for dv in args.value_dims:
        for B in args.batch_sizes:
            state_bytes, all_bytes = step_bytes(B, H, d, dv, E, torch.finfo(dtype).bits // 8)
            row = {"dv": dv, "B": B, "state MB": state_bytes / 1e6, "floor ms": 1e3 * state_bytes / bandwidth,
                   "torch ms": time_step("torch", B, H, d, dv, dtype)}
            for backend in backends:
                ms = row[f"{backend} ms"] = time_step(backend, B, H, d, dv, dtype)
                row[f"{backend} GB/s"] = all_bytes / (ms * 1e-3) / 1e9
                row[f"{backend} % of copy"] = 100 * all_bytes / (ms * 1e-3) / bandwidth
                row[f"torch/{backend}"] = row["torch ms"] / ms
            rows.append(row)
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
    columns = list(rows[0])
    print("\n".join(format_table([{c: (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in columns}
                                  for r in rows], columns)))
    if args.out:
        write_results(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
