"""Training throughput: Based against the Transformer++ baseline of the same size (random weights and tokens).

Each model trains for `--steps` timed steps (after `--warmup` untimed ones, which also compile) on the same
number of tokens per step at every sequence length: batch = tokens_per_step / T. A step is the forward with the
loss (`model(ids, labels=ids)`: the fused LM-head cross-entropy, or with `--loss logits` the full fp32 logits
and `F.cross_entropy`, as most training code does), the backward and an AdamW step. Modes: "eager" and
"compiled": `torch.compile(model)`, or with `--compile-scope blocks` each block compiled on its own (PyTorch's
regional compilation: the blocks of one kind share one compiled graph, so the cold compile is several times
shorter, and the embedding, the final norm and the loss stay eager). Every T compiles afresh with static shapes.
Printed per model, mode and T: tokens/s (median step), MFU, peak memory, the seconds of the warmup steps (which
include the compile), and Based / Transformer++ at equal mode and T.

MFU counts 6 x parameters + the attention FLOPs per token (training = 3 x forward): Transformer++ causal
attention 6 * n_layers * d_model * T; Based's linear attention 3 * heads * (2 * 64 * (f + dv) + 4 * E * dv) per
layer (chunk 64, f the feature dim, E = 1 + f + f(f+1)/2) and sliding window 12 * d_model * window per layer;
over the card's dense bf16 peak (named in the output; `--peak-tflops` for cards the script does not know).

Also printed: the extra memory of the loss path alone at `--loss-memory-tokens` tokens and the model's vocabulary
(the LM head's input hidden states in, their gradient and the weight's out), fused against full logits.

With no arguments: the small "tiny" models on whatever device exists, eager, T=64, a few hundred tokens per step
(well under a minute on 2 CPU cores). The paper-scale run on one GPU:

    python benchmarks/train_throughput.py --model based-360m --seqlens 2048 8192 16384 --modes eager compiled \\
        --out train.json --plot train.png
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from _common import (DTYPES, banner, check_out_path, default_device, environment, format_table, median_seconds,
                     model_configs, synchronize, write_results)

from based.models import BasedLM, Transformer
from based.ops import linear_cross_entropy

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), matched on the device name.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "based-360m", "based-1.3b"], default="tiny")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None, help="default: 2048 8192 16384 on a GPU, "
                        "64 on CPU")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default: 32768 on a GPU, 256 on CPU")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None,
                        help="default: eager compiled on a GPU, eager on CPU")
    parser.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                        help="what the compiled mode compiles: the whole model or each block (default: model)")
    parser.add_argument("--loss", choices=["fused", "logits"], default="fused")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on a GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on a GPU, 1 on CPU)")
    parser.add_argument("--loss-memory-tokens", type=int, default=32768, help="tokens of the loss-memory check "
                        "(GPU only)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on a GPU, "
                        "float32 on CPU")
    parser.add_argument("--device", type=torch.device, default=None)
    parser.add_argument("--out", help="write the rows to this .json or .csv file")
    parser.add_argument("--plot", help="save a PNG of tokens/s against T (needs matplotlib)")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    gpu = args.device.type == "cuda"
    args.seqlens = args.seqlens or ([2048, 8192, 16384] if gpu else [64])
    args.tokens_per_step = args.tokens_per_step or (32768 if gpu else 256)
    args.modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    for T in args.seqlens:
        if T < 2 or args.tokens_per_step % T:
            parser.error(f"every T must be >= 2 and divide --tokens-per-step ({args.tokens_per_step}), got {T}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def attention_flops_per_token(model, T: int) -> float:
    """Training FLOPs per token of the token mixers beyond 6 x parameters (see the module docstring)."""
    c = model.config
    if isinstance(model, Transformer):
        return 6 * c.n_layers * c.d_model * T
    f, dv = c.feature_dim, c.head_dim
    E = 1 + f + f * (f + 1) // 2
    linear = 3 * c.n_heads * (2 * 64 * (f + dv) + 4 * E * dv)
    window = 12 * c.d_model * min(c.window, T)
    return len(c.linear_attention_layers) * linear + len(c.sliding_window_layers) * window


def peak_flops(args) -> tuple[float | None, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        for key, value in BF16_PEAKS.items():
            if key in name:
                return value, f"{value / 1e12:g} TFLOP/s dense bf16 ({key} datasheet)"
    return None, "unknown (pass --peak-tflops)"


def logits_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


@contextlib.contextmanager
def compiled(model, mode: str, scope: str):
    """The callable a training step runs in `mode`; with scope "blocks", the model's blocks are swapped for
    their compiled wrappers until the context ends."""
    if mode == "eager":
        yield model
        return
    torch._dynamo.reset()  # each T compiles afresh, so no cache limit is reached across lengths and kinds
    if scope == "model":
        yield torch.compile(model, dynamic=False)
        return
    layers = model.transformer.layers
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = torch.compile(layer, dynamic=False)
    try:
        yield model
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def train_step_seconds(model, T: int, mode: str, args) -> tuple[float, float | None, float] | None:
    """(median seconds per step, peak MB or None off the GPU, seconds of the warmup steps), or None when it
    runs out of memory."""
    batch = args.tokens_per_step // T
    ids = torch.randint(0, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(T))
    ids = ids.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.type == "cuda")

    def step(forward):
        loss = forward(ids, labels=ids) if args.loss == "fused" else logits_loss(forward, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gpu = args.device.type == "cuda"
    try:
        with compiled(model, mode, args.compile_scope) as forward:
            if gpu:
                torch.cuda.reset_peak_memory_stats(args.device)
            started = time.perf_counter()
            for _ in range(args.warmup):
                step(forward)
            synchronize(args.device)
            warmup_seconds = time.perf_counter() - started
            seconds = median_seconds(lambda: step(forward), args.device, warmup=0, repeats=args.steps)
        peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if gpu else None
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del optimizer
        if gpu:
            torch.cuda.empty_cache()
    return seconds, peak, warmup_seconds


def loss_memory_mb(model, tokens: int, args) -> dict[str, float]:
    """Peak memory above the inputs of the loss path alone (forward + backward) at `tokens` tokens: the fused
    op against full fp32 logits + F.cross_entropy."""
    weight = model.lm_head.weight
    labels = torch.randint(0, model.config.vocab_size, (tokens,), device=args.device)
    out = {}
    for name in ("fused", "logits"):
        x = torch.randn(tokens, weight.shape[1], device=args.device, dtype=weight.dtype, requires_grad=True)
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
        base = torch.cuda.memory_allocated(args.device)
        backend = "auto" if name == "fused" else "torch"
        try:
            linear_cross_entropy(x, weight, labels, backend=backend).backward()
            synchronize(args.device)
            out[f"loss path extra MB ({name})"] = (torch.cuda.max_memory_allocated(args.device) - base) / 2**20
        except torch.cuda.OutOfMemoryError:
            out[f"loss path extra MB ({name})"] = float("nan")
        del x
        weight.grad = None
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    check_out_path(args.out)
    env = environment(args.device)
    peak, peak_source = peak_flops(args)
    print(banner(env))
    based_config, transformer_config = model_configs(args.model)
    print(f"model {args.model}, {str(args.dtype).removeprefix('torch.')}, {args.tokens_per_step} tokens per step, "
          f"loss {args.loss}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}, "
          f"compile scope {args.compile_scope}; "
          f"MFU against {peak_source}")
    rows, summary = [], {}
    for name, model_class, config in [("Transformer++", Transformer, transformer_config),
                                      ("Based", BasedLM, based_config)]:
        torch.manual_seed(0)
        model = model_class(config, device=args.device, dtype=args.dtype).train()
        model.activation_checkpointing = args.activation_checkpointing
        params = sum(p.numel() for p in model.parameters())
        if args.device.type == "cuda" and args.loss_memory_tokens:
            summary[name] = loss_memory_mb(model, args.loss_memory_tokens, args)
            print(f"  {name}: loss path alone at {args.loss_memory_tokens} tokens x {config.padded_vocab_size} "
                  "vocabulary: " + ", ".join(f"{k} {v:,.0f}" for k, v in summary[name].items()), flush=True)
        for mode in args.modes:
            for T in args.seqlens:
                result = train_step_seconds(model, T, mode, args)
                row = {"model": name, "mode": mode, "T": T, "params_M": round(params / 1e6, 1),
                       "tokens_per_s": None, "MFU": None, "peak_memory_MB": None, "warmup_s": None}
                if result is not None:
                    seconds, peak_mb, warmup_seconds = result
                    tokens_per_s = args.tokens_per_step / seconds
                    flops = 6 * params + attention_flops_per_token(model, T)
                    row.update(tokens_per_s=round(tokens_per_s, 1),
                               MFU=None if peak is None else round(tokens_per_s * flops / peak, 4),
                               peak_memory_MB=None if peak_mb is None else round(peak_mb),
                               warmup_s=round(warmup_seconds, 1))
                print(f"  {name:13s} {mode:8s} T={T:6d}: "
                      + ("out of memory" if result is None else
                         f"{row['tokens_per_s']:,.0f} tokens/s (warmup {row['warmup_s']:.1f} s)"), flush=True)
                rows.append(row)
        del model
    for row in rows:
        other = next(r for r in rows if r["model"] == "Transformer++" and (r["mode"], r["T"]) == (row["mode"], row["T"]))
        if row["model"] == "Based" and row["tokens_per_s"] and other["tokens_per_s"]:
            row["based_over_transformer"] = round(row["tokens_per_s"] / other["tokens_per_s"], 3)
    columns = ["model", "mode", "T", "params_M", "tokens_per_s", "MFU", "peak_memory_MB", "warmup_s",
               "based_over_transformer"]
    print("\n".join(format_table(rows, columns)))
    if args.out:
        write_results(args.out, [{c: r.get(c) for c in columns} for r in rows], env, summary or None)
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("Transformer++", "Based"):
        for mode in sorted({r["mode"] for r in rows}):
            points = [(r["T"], r["tokens_per_s"]) for r in rows
                      if (r["model"], r["mode"]) == (name, mode) and r["tokens_per_s"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{name} ({mode})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("training tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
