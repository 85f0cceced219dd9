"""Generation throughput: Based against the Transformer++ baseline of the same size (random weights).

Each model first prefills one random prompt of `--prompt-len` tokens (batch 1, timed: the prefill rate). For
each batch size its caches are then copied to every row of a batch (decoding cost does not depend on what the
tokens are) and the model greedily decodes `--gen-len` tokens from them, one step per token, with the same
`DecodeSession` that `model.generate` uses: over static caches, replayed from a CUDA graph on a GPU unless
`--no-cuda-graph`. tokens/s = batch * gen_len / decode time (median of `--repeats` runs, each from a fresh
copy of the prefilled caches, after the graph is captured). So the throughput is that of generation at a
context of prompt_len..prompt_len + gen_len, as in the BASED paper, not diluted by the prompt's prefill,
which a real server overlaps with other requests' decoding.

A model that runs out of GPU memory at one batch size is not tried at larger ones, so a long list of batch
sizes sweeps each model up to what memory holds. Also printed: each model's peak tokens/s and the ratio of
the peaks, the peak GPU memory of each run, the batch-1 decode latency (ms/token) against the weight-read
floor (the model's weight bytes over the copy bandwidth measured in the same run), and the prefill rate.

With no arguments: small models derived from the 360M presets (d_model 256, 5 Based layers and 4
Transformer layers, the presets' vocabulary) on whatever device exists; well under a minute on 2 CPU cores.
A paper-scale run on a GPU:

    python benchmarks/gen_throughput.py --model based-1.3b --batch-sizes 1 4 16 64 256 1024 2048 \\
        --prompt-len 8192 --gen-len 1024 --out gen.json --plot gen.png
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import (DTYPES, attention_kernel, banner, check_out_path, copy_bandwidth, default_device, dtype_name,
                     environment, format_table, median_seconds, model_configs, synchronize, write_results)

from based.generation import DecodeSession
from based.models import BasedLM, Transformer
from based.ops.linear_attention.interface import step_backend


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "based-360m", "based-1.3b"], default="tiny",
                        help="Based model; the Transformer++ preset of the same size is the baseline (default: tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], metavar="B",
                        help="ascending; a model that runs out of memory is not tried at larger ones")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--device", type=torch.device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode runs per batch size (default: 3 on a GPU, 1 on CPU)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--out", help="write the results to this .json or .csv file")
    parser.add_argument("--plot", help="save a PNG of tokens/s against batch size (needs matplotlib)")
    args = parser.parse_args(argv)
    for name in ("prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("batch sizes and --repeats must be >= 1")
    args.device = args.device or default_device()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype = DTYPES[args.dtype]
    args.repeats = args.repeats or (3 if args.device.type == "cuda" else 1)
    return args


def prefill(model, args):
    """(cache, next token, seconds): a timed batch-1 prefill of a random prompt, its caches sized for the
    whole generation plus the decode warm-up. An untimed prefill of the same prompt runs first, so kernel
    compilation and library initialisation are not counted."""
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    model(prompt, cache=model.new_cache(1, args.prompt_len))
    cache = model.new_cache(1, args.prompt_len + args.gen_len + DecodeSession.steps_before_replay())
    synchronize(args.device)
    start = time.perf_counter()
    logits = model(prompt, cache=cache)
    synchronize(args.device)
    return cache, logits[:, -1].argmax(-1), time.perf_counter() - start


def decode(model, batch: int, prefilled, args) -> tuple[float, float | None] | None:
    """(median decode seconds for gen_len tokens, peak GPU MB or None off the GPU) at this batch size, or
    None when it runs out of GPU memory."""
    source, first_token, _ = prefilled
    on_gpu = args.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(args.device)
    try:
        session = model.decode_session(batch, source.max_seqlen, cuda_graph=on_gpu and not args.no_cuda_graph)

        def refill():  # every cache leaf has the batch first (positions are 0-dim): broadcast row 0
            session.cache.copy_(source)

        refill()
        first = first_token.expand(batch).contiguous()

        def generate_tokens(steps: int) -> None:
            token = first
            for _ in range(steps):
                token = session.step(token).argmax(-1)

        generate_tokens(DecodeSession.steps_before_replay())  # eager warm-up and capture, untimed
        seconds = median_seconds(lambda: generate_tokens(args.gen_len), args.device, warmup=0,
                                 repeats=args.repeats, setup=refill)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        peak_mb = torch.cuda.max_memory_allocated(args.device) / 2**20 if on_gpu else None
        session = None
        if on_gpu:
            torch.cuda.empty_cache()
    return seconds, peak_mb


def plot(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(row["model"] for row in rows):
        points = [(r["batch"], r["tokens_per_s"]) for r in rows if r["model"] == model and r["tokens_per_s"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=model)
    batches = sorted({row["batch"] for row in rows})
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens / s")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def based_kernels(device: torch.device) -> str:
    """What runs Based's linear-attention decode step here (the other layers use Triton on a GPU)."""
    return {"triton": "Triton step", "cuda": "based._C step", "torch": "torch"}[step_backend(device)]


def summarise(rows: list[dict], models: dict, prefill_seconds: dict, args) -> dict:
    """Each model's peak tokens/s (and its batch), the ratio of the peaks, the batch-1 decode latency against
    the weight-read floor (on a GPU) and the batch-1 prefill rate."""
    summary = {}
    for name in models:
        measured = [r for r in rows if r["model"] == name and r["tokens_per_s"]]
        best = max(measured, key=lambda r: r["tokens_per_s"], default=None)
        summary[f"{name} peak tokens/s"] = None if best is None else best["tokens_per_s"]
        summary[f"{name} peak batch"] = None if best is None else best["batch"]
    peaks = [summary[f"{name} peak tokens/s"] for name in ("Based", "Transformer++")]
    summary["Based / Transformer++ peak"] = round(peaks[0] / peaks[1], 2) if all(peaks) else None
    bandwidth = copy_bandwidth() if args.device.type == "cuda" else None
    for name, model in models.items():
        batch_1 = [r for r in rows if r["model"] == name and r["batch"] == 1 and r["ms_per_token"]]
        summary[f"{name} batch-1 ms/token"] = batch_1[0]["ms_per_token"] if batch_1 else None
        if bandwidth:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            summary[f"{name} weight-read floor ms"] = round(1e3 * weight_bytes / bandwidth, 3)
        summary[f"{name} prefill tokens/s (batch 1)"] = round(args.prompt_len / prefill_seconds[name], 1)
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    check_out_path(args.out)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("--plot needs matplotlib: pip install matplotlib (or the 'bench' extra: pip install '.[bench]')")

    env = environment(args.device)
    print(banner(env))
    torch.manual_seed(0)
    based_config, transformer_config = model_configs(args.model)
    models = {
        "Transformer++": Transformer(transformer_config, device=args.device, dtype=args.dtype).eval(),
        "Based": BasedLM(based_config, device=args.device, dtype=args.dtype).eval(),
    }
    kernels = {"Transformer++": attention_kernel(args.device, args.dtype), "Based": based_kernels(args.device)}
    graphs = args.device.type == "cuda" and not args.no_cuda_graph
    print(f"model {args.model}, {dtype_name(args.dtype)}, prompt {args.prompt_len}, generating {args.gen_len}, "
          f"CUDA graphs {'on' if graphs else 'off'}; Transformer++ attention: {kernels['Transformer++']}")

    with torch.inference_mode():
        prefilled = {name: prefill(model, args) for name, model in models.items()}
    rows, out_of_memory = [], set()
    for batch in args.batch_sizes:
        throughput, peak_mb, step_ms = {}, {}, {}
        for name, model in models.items():
            with torch.inference_mode():
                result = None if name in out_of_memory else decode(model, batch, prefilled[name], args)
            if result is None:
                out_of_memory.add(name)
                throughput[name] = peak_mb[name] = step_ms[name] = None
            else:
                throughput[name], peak_mb[name] = batch * args.gen_len / result[0], result[1]
                step_ms[name] = 1e3 * result[0] / args.gen_len
            rate = "out of memory" if throughput[name] is None else f"{throughput[name]:,.1f} tokens/s"
            print(f"  {name:<13} batch {batch:>4}: {rate}", flush=True)
        for name, model in models.items():
            tps, baseline = throughput[name], throughput["Transformer++"]
            ratio = tps / baseline if name == "Based" and tps and baseline else None
            rows.append({
                "model": name, "config": args.model, "attention": kernels[name],
                "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "batch": batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                "dtype": dtype_name(args.dtype), "device": env["device"], "cuda_graph": graphs,
                "tokens_per_s": None if tps is None else round(tps, 1),
                "based_over_transformer": None if ratio is None else round(ratio, 2),
                "ms_per_token": None if step_ms[name] is None else round(step_ms[name], 3),
                "peak_memory_MB": None if peak_mb[name] is None else round(peak_mb[name]),
            })

    print()
    shown = [{**row, "tokens_per_s": "OOM" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.1f}",
              "based_over_transformer": "" if row["based_over_transformer"] is None
              else f"{row['based_over_transformer']:.2f}x",
              "peak_memory_MB": "" if row["peak_memory_MB"] is None else row["peak_memory_MB"]} for row in rows]
    columns = ["model", "attention", "params_M", "batch", "prompt_len", "gen_len", "tokens_per_s", "ms_per_token",
               "based_over_transformer", "peak_memory_MB"]
    print("\n".join(format_table(shown, columns)))
    summary = summarise(rows, models, {name: p[2] for name, p in prefilled.items()}, args)
    print("\n".join(f"{key}: {value}" for key, value in summary.items()))
    if args.out:
        write_results(args.out, rows, env, summary)
        print(f"wrote {args.out}")
    if args.plot:
        plot(args.plot, rows, f"{args.model}, {env['device']}, prompt {args.prompt_len}, gen {args.gen_len}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
