"""Sliding-window attention speed: our Triton kernels against FlashAttention-2 and compiled flex_attention.

    python benchmarks/sliding_window.py                  # B=8, H=16, head dim 64, bf16, T = 1k..32k
    python benchmarks/sliding_window.py --seqlens 8192 --windows 129 --out sw.json
    python benchmarks/sliding_window.py --tune           # block shapes of our kernels at T=8192, window 129

Prefill table: forward and forward+backward medians (`triton.testing.do_bench`, CUDA events) of ours,
FlashAttention-2 full causal attention (flash_attn when importable, else SDPA's flash backend), flash_attn
with `window_size=(window-1, 0)` when importable, and `torch.compile(flex_attention)` with a sliding-window
block mask; ratios are baseline time / ours, measured in the same run. `ours T/T8k` is our forward time over
our forward time at T=8192 (4.0 when time is linear in T; put 8192 before longer T in --seqlens).

Decode table: one token per sequence (B=16 by default), our fused ring-buffer step (window slots) against
SDPA-flash over a full KV cache of the context length, both replayed from CUDA graphs so launch overhead is
not what is measured.
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import (
    DTYPES, banner, check_out_path, environment, fa2_causal, format_table, gpu_missing, gpu_ms, graph_ms, write_results,
)

from based.ops import WindowCache, sliding_window_attention, sliding_window_attention_step


def flash_attn_window():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return lambda q, k, v, window: flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))


def flex_sliding_window():
    """[B, T, H, D] -> flex_attention under torch.compile with a sliding-window block mask (cached per T)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per (T, window) here; raise dynamo's limit so it never falls back to eager flex,
    # which materialises T x T scores.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v, window):
        T = q.shape[1]
        if (T, window) not in masks:
            def band(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

            masks[T, window] = create_block_mask(band, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[T, window])
        return out.transpose(1, 2)

    return run


def prefill_rows(B, H, D, dtype, seqlens, windows):
    fa2_name, fa2 = fa2_causal()
    fa_window = flash_attn_window()
    flex = flex_sliding_window()
    rows, ours_at_8k = [], {}
    for T in seqlens:
        qkv = [torch.randn(B, T, H, D, device="cuda", dtype=dtype).requires_grad_() for _ in range(3)]
        full = {"fwd": gpu_ms(fa2, qkv, backward=False), "fwd+bwd": gpu_ms(fa2, qkv, backward=True)}
        for window in windows:
            candidates = [("ours", lambda q, k, v: sliding_window_attention(q, k, v, window=window)),
                          ("flex", lambda q, k, v: flex(q, k, v, window))]
            if fa_window is not None:
                candidates.append(("flash_attn window", lambda q, k, v: fa_window(q, k, v, window)))
            row = {"window": window, "T": T}
            for name, fn in candidates:
                row[f"{name} fwd ms"] = gpu_ms(fn, qkv, backward=False)
                row[f"{name} fwd+bwd ms"] = gpu_ms(fn, qkv, backward=True)
            row[f"{fa2_name} full fwd ms"], row[f"{fa2_name} full fwd+bwd ms"] = full["fwd"], full["fwd+bwd"]
            for name in [name for name, _ in candidates[1:]] + [f"{fa2_name} full"]:
                for mode in ("fwd", "fwd+bwd"):
                    row[f"{name}/ours {mode}"] = row[f"{name} {mode} ms"] / row[f"ours {mode} ms"]
            if T == 8192:
                ours_at_8k[window] = row["ours fwd ms"]
            row["ours fwd T/8k"] = row["ours fwd ms"] / ours_at_8k.get(window, float("nan"))
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows, fa2_name


def decode_rows(B, H, D, dtype, contexts, window):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q, k, v = (torch.randn(B, H, D, device="cuda", dtype=dtype) for _ in range(3))
    cache = WindowCache.zeros(B, window, H, D, device="cuda", dtype=dtype)
    pos = torch.tensor(10**6, device="cuda")  # a full ring, far into generation
    ours = graph_ms(lambda: sliding_window_attention_step(q, k, v, cache, pos))
    rows = []
    for L in contexts:
        k_cache, v_cache = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(2))

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return scaled_dot_product_attention(q[:, :, None], k_cache, v_cache)

        full = graph_ms(sdpa)
        rows.append({"B": B, "context": L, "ours step ms": ours, "SDPA-flash full cache ms": full,
                     "SDPA/ours": full / ours})
    return rows


def tune(B, H, D, dtype):
    """Block shapes of the forward, dq and dk/dv kernels at T=8192, window 129."""
    from based.ops.sliding_window import triton_bwd, triton_fwd

    T, window = 8192, 129
    qkv = [torch.randn(B, T, H, D, device="cuda", dtype=dtype).requires_grad_() for _ in range(3)]
    fn = lambda q, k, v: sliding_window_attention(q, k, v, window=window)  # noqa: E731
    shapes = [(64, 64, 4, 3, 120), (64, 64, 4, 3, None), (64, 32, 4, 3, 80), (64, 32, 4, 3, None),
              (128, 64, 8, 3, None), (64, 64, 4, 2, 120)]
    rows = []

    def set_forward(shape):
        (triton_fwd.FWD_BLOCK_M, triton_fwd.FWD_BLOCK_N, triton_fwd.FWD_WARPS, triton_fwd.FWD_STAGES,
         triton_fwd.FWD_MAX_REGISTERS) = shape

    default = (triton_fwd.FWD_BLOCK_M, triton_fwd.FWD_BLOCK_N, triton_fwd.FWD_WARPS, triton_fwd.FWD_STAGES,
               triton_fwd.FWD_MAX_REGISTERS)
    for shape in shapes:
        set_forward(shape)
        rows.append({"kernel": "fwd", "BM, BN, warps, stages, max registers": shape,
                     "ms": gpu_ms(fn, qkv, backward=False)})
        print(rows[-1], flush=True)
    set_forward(default)
    fwd_only = gpu_ms(fn, qkv, backward=False)
    for dq_shape in [(64, 64, 4, 2), (64, 64, 4, 1), (64, 32, 4, 2)]:
        for dkdv_shape in [(64, 64, 4, 1), (64, 32, 4, 2), (32, 32, 2, 2)]:
            (triton_bwd.DQ_BLOCK_M, triton_bwd.DQ_BLOCK_N, triton_bwd.DQ_WARPS, triton_bwd.DQ_STAGES) = dq_shape
            (triton_bwd.DKDV_BLOCK_M, triton_bwd.DKDV_BLOCK_N, triton_bwd.DKDV_WARPS,
             triton_bwd.DKDV_STAGES) = dkdv_shape
            both = gpu_ms(fn, qkv, backward=True)
            rows.append({"kernel": f"bwd dq {dq_shape} dkdv", "BM, BN, warps, stages, max registers": dkdv_shape,
                         "ms": both - fwd_only})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 129, 256])
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tune", action="store_true", help="sweep our kernels' block shapes instead")
    parser.add_argument("--out", help="write the rows to a .json or .csv file")
    args = parser.parse_args(argv)
    check_out_path(args.out)
    if gpu_missing("sliding_window.py"):
        return 1
    dtype = DTYPES[args.dtype]
    env = environment(torch.device("cuda"))
    print(banner(env))
    B, H, D = args.batch, args.heads, args.head_dim
    if args.tune:
        rows = tune(B, H, D, dtype)
        print("\n".join(format_table([{k: str(v) for k, v in r.items()} for r in rows], list(rows[0]))))
        return 0

    rows, fa2_name = prefill_rows(B, H, D, dtype, args.seqlens, args.windows)
    print(f"\nprefill: B={B} H={H} head dim {D} {args.dtype}; FA2 = {fa2_name}; "
          f"flash_attn window: {'yes' if flash_attn_window() else 'not installed'}")
    columns = list(rows[0])
    print("\n".join(format_table([{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in columns}
                                  for r in rows], columns)))
    window = 129 if 129 in args.windows else args.windows[0]
    decode = decode_rows(args.decode_batch, H, D, dtype, args.decode_contexts, window)
    print(f"\ndecode: one token, B={args.decode_batch} H={H} head dim {D} {args.dtype}, ring of {window} slots, "
          "CUDA-graph replays")
    columns = list(decode[0])
    print("\n".join(format_table([{c: (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in columns}
                                  for r in decode], columns)))
    if args.out:
        write_results(args.out, rows + decode, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
