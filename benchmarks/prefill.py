"""Prefill speed of one Based linear-attention layer against FlashAttention-2 and fla's Based kernels.

    python benchmarks/prefill.py                      # B=8, H=16, d=16, dv=64, bf16, T = 1k..16k
    python benchmarks/prefill.py --seqlens 4096 --out prefill.json

Our rows: `based triton` (the Triton kernels) and, on a compute capability 9.0 GPU with the Hopper kernels
built, `based cuda` (the Hopper forward and backward kernels).
Times are `triton.testing.do_bench` medians (CUDA events) of the forward and of forward+backward. FA2 is
`flash_attn` when importable, else PyTorch SDPA's FLASH_ATTENTION backend (the same FlashAttention-2 code),
causal, head dim = dv. fla's `parallel_based` / `fused_chunk_based` run when the package is installed.
Ratios are baseline time / our time measured in the same run.

The "floor ms" column estimates the least time a chunked forward could take on this card. Per token and head
(chunk 64, d=16, dv=64):
  - tensor-core FLOPs: intra-chunk q k^T and (q k^T) v, 2*64*(d + dv) = 2*64*(16 + 64) = 10.2 kFLOP, plus
    reading and updating the state, 4*F*dv with F feature-map features. `flops_per_token_head` counts
    F = 1 + d + d*d = 273, the released 273-feature map: 69.9 kFLOP, 80.1 kFLOP in all. That is also
    the count our Triton kernels work on: they keep raw sums over all 1 + d + d*d products and convert
    to the 153-feature public state at the end (based/ops/linear_attention/triton_common.py). The
    symmetric map alone, F = 153 padded to 160, would need 41.0 kFLOP, 51.2 kFLOP in all; the column
    does not use that count. The chunk of 64 is the formula's; the kernels run 16-token chunks (CHUNK
    in triton_common.py).
  - HBM bytes: q, k, v read and o written once, 2*d + 2*dv = 160 values: 320 bytes in bf16 (the
    element size follows --dtype).
With both totalled over the B*H*T token-heads, the floor is max(FLOPs / bf16 matrix rate, bytes /
bandwidth), where the rate is that of an 8192^3 bf16 matmul and the bandwidth that of a device-to-device
copy, both measured at the start of the run (`_common.ceilings`), not datasheet peaks.
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    DTYPES, banner, ceilings, check_out_path, environment, fa2_causal, format_table, gpu_missing, gpu_ms, write_results,
)

from based.ops import linear_attention


def flops_per_token_head(d: int, dv: int, chunk: int = 64) -> float:
    """Matrix FLOPs of the chunked forward per token and head: intra-chunk q k^T and a v, state read and
    state update over the 1 + d + d*d raw features."""
    features = 1 + d + d * d
    return 2 * chunk * d + 2 * chunk * dv + 2 * 2 * features * dv


def hopper_backend(device, dtype, d: int, dv: int) -> list[str]:
    """["cuda"] when the Hopper forward (`backend="cuda"`) takes these shapes on this machine, else []."""
    from based.ops.linear_attention.cuda_op import unsupported_reason  # noqa: PLC0415

    probe = torch.empty(1, 1, 1, d, device=device, dtype=dtype), torch.empty(1, 1, 1, dv, device=device, dtype=dtype)
    reason = unsupported_reason(*probe, True)
    if reason is not None:
        print(f"based cuda: not run ({reason})")
    return [] if reason else ["cuda"]


def fla_kernels():
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
    except ImportError:
        return {}
    # fla takes [B, T, H, d] in 0.6 (head_first=False is its default layout).
    return {"fla parallel": parallel_based, "fla fused_chunk": fused_chunk_based}


def peak_memory_mb(fn, inputs) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the rows to a .json or .csv file")
    args = parser.parse_args(argv)
    check_out_path(args.out)
    if gpu_missing("prefill.py"):
        return 1
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    env = environment(device)
    B, H, d, dv = args.batch, args.heads, args.feature_dim, args.value_dim
    fa2_name, fa2 = fa2_causal()
    backends = ["triton"] + hopper_backend(device, dtype, d, dv)
    fla = fla_kernels()
    bandwidth, matmul_rate = ceilings()
    print(banner(env))
    print(f"B={B} H={H} d={d} dv={dv} {args.dtype}; FA2 = {fa2_name}; fla: {', '.join(fla) or 'not installed'}; "
          f"measured ceilings: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")

    rows = []
    for T in args.seqlens:
        def make(last):
            return torch.randn(B, T, H, last, device=device, dtype=dtype).requires_grad_()

        qkv = (make(d), make(d), make(dv))
        fa2_qkv = (make(dv), make(dv), make(dv))
        ours = {f"based {backend}": (lambda q, k, v, backend=backend: linear_attention(q, k, v, backend=backend))
                for backend in backends}
        row = {"T": T}
        for name, fn, inputs in [(name, fn, qkv) for name, fn in ours.items()] + [(fa2_name, fa2, fa2_qkv)] + [
                (name, fn, qkv) for name, fn in fla.items()]:
            row[f"{name} fwd ms"] = gpu_ms(fn, inputs, backward=False)
            row[f"{name} fwd+bwd ms"] = gpu_ms(fn, inputs, backward=True)
        flops = flops_per_token_head(d, dv) * B * H * T
        bytes_moved = B * H * T * (2 * d + 2 * dv) * torch.finfo(dtype).bits // 8
        for name, fn in ours.items():
            row[f"{name} peak MB"] = peak_memory_mb(fn, qkv)
            for what in ("fwd", "fwd+bwd"):
                row[f"FA2/{name} {what}"] = row[f"{fa2_name} {what} ms"] / row[f"{name} {what} ms"]
                if fla:
                    best = min(row[f"{other} {what} ms"] for other in fla)
                    row[f"best fla/{name} {what}"] = best / row[f"{name} {what} ms"]
            row[f"{name} fwd TFLOP/s"] = flops / (row[f"{name} fwd ms"] * 1e-3) / 1e12
        row["floor ms"] = 1e3 * max(flops / matmul_rate, bytes_moved / bandwidth)
        rows.append(row)

    columns = list(rows[0])
    formatted = [{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in columns} for r in rows]
    print("\n".join(format_table(formatted, columns)))
    if args.out:
        write_results(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
