"""The training-path kernels of a block against their PyTorch references, eager and compiled.

    python benchmarks/train_kernels.py                          # based-360m shapes, T=2048, 32768 tokens, bf16
    python benchmarks/train_kernels.py --model based-1.3b --seqlen 8192 --out kernels.json

For each op at the shapes one training step of the model gives it (batch = tokens / T): forward and
forward+backward medians (`triton.testing.do_bench`, CUDA events) of the Triton kernels, the PyTorch reference
run eagerly, and the reference under `torch.compile` (static shapes), with reference / Triton and compiled /
Triton ratios from the same run. This is the measurement `backend="auto"` follows when autograd records the op.

Ops, as the blocks call them: RMSNorm of the fp32 residual stream (the block's first norm), RMSNorm with the
residual add (bf16 input, fp32 residual; the second norm), rotary on q and k of the fused projection (a strided
view), and BaseConv's gated causal depthwise convolution (kernel 3 over 2 * d_model channels, x and the gate the
halves of one projection).
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import DTYPES, banner, check_out_path, environment, format_table, gpu_missing, model_configs, write_results

from based.ops import apply_rotary, gated_conv1d, rms_norm


def cases(config, B: int, T: int, dtype: torch.dtype):
    """(name, shape text, op(backend, *inputs), inputs): fresh leaf tensors that need gradients."""
    D, H = config.d_model, config.n_heads
    hd, channels, K = D // H, config.conv_expand * D // 2, config.conv_kernel_size
    leaf = lambda *shape, dtype=dtype: torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_()  # noqa: E731
    positions = torch.arange(T, device="cuda")

    def norm(backend, x, weight):
        return rms_norm(x, weight, config.norm_eps, backend=backend)

    def norm_residual(backend, x, weight, residual):
        return rms_norm(x, weight, config.norm_eps, residual=residual, backend=backend)

    def rotary(backend, qkv):
        # q and k of a fused [B, T, 3 * D] projection, as `based.nn.rotary.rotated_qkv` takes them.
        qk = qkv.view(B, T, 3, H, hd)[:, :, :2].flatten(2, 3)
        return apply_rotary(qk, positions, config.rotary_base, backend=backend)

    def gated_conv(backend, projection, weight):
        # u1, u2 halves of BaseConv's in_proj output, as the layer hands them over.
        x, gate = projection.split(channels, dim=-1)
        return gated_conv1d(x, gate, weight, backend=backend)

    return [
        ("rms_norm (fp32 residual in)", f"[{B}, {T}, {D}]", norm, (leaf(B, T, D, dtype=torch.float32), leaf(D))),
        ("rms_norm + residual add", f"[{B}, {T}, {D}]", norm_residual,
         (leaf(B, T, D), leaf(D), leaf(B, T, D, dtype=torch.float32))),
        ("rotary (q, k of qkv)", f"[{B}, {T}, {2 * H}, {hd}]", rotary, (leaf(B, T, 3 * D),)),
        ("silu(conv(u1)) * u2", f"[{B}, {T}, {channels}] k={K}", gated_conv, (leaf(B, T, 2 * channels),
                                                                               leaf(channels, K))),
    ]


def timed_ms(fn, inputs, *, backward: bool) -> float:
    """Median GPU time of `fn(*inputs)` (one tensor or a tuple of them), with a backward pass of random
    output gradients when `backward`."""
    import triton.testing

    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(o) for o in outputs] if backward else None

    def run():
        out = fn(*inputs)
        if backward:
            torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["based-360m", "based-1.3b"], default="based-360m")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens / seqlen)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--out", help="write the rows to this .json or .csv file")
    args = parser.parse_args(argv)
    check_out_path(args.out)
    if args.seqlen < 1 or args.tokens % args.seqlen:
        parser.error(f"--seqlen must divide --tokens ({args.tokens}), got {args.seqlen}")
    if gpu_missing("train_kernels.py"):
        return 1
    env = environment(torch.device("cuda"))
    print(banner(env))
    config = model_configs(args.model)[0]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    rows = []
    for name, shape, op, inputs in cases(config, args.tokens // args.seqlen, args.seqlen, dtype):
        compiled = torch.compile(lambda *a, op=op: op("torch", *a), dynamic=False)
        candidates = {"triton": lambda *a, op=op: op("triton", *a), "torch": lambda *a, op=op: op("torch", *a),
                      "compiled torch": compiled}
        row = {"op": name, "shape": shape}
        for label, fn in candidates.items():
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                row[f"{label} {mode} ms"] = round(timed_ms(fn, inputs, backward=backward), 4)
        for label in ("torch", "compiled torch"):
            for mode in ("fwd", "fwd+bwd"):
                row[f"{label}/triton {mode}"] = round(row[f"{label} {mode} ms"] / row[f"triton {mode} ms"], 2)
        rows.append(row)
        print(row, flush=True)
    print(f"{args.model} shapes, T={args.seqlen}, {args.tokens} tokens, {args.dtype}")
    print("\n".join(format_table(rows, list(rows[0]))))
    if args.out:
        write_results(args.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
