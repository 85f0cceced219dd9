"""End-to-end generation throughput: Based against the Transformer++ baseline of the same size.

For each batch size, both models (random weights) greedily generate `--gen-len` tokens after a random
prompt of `--prompt-len` tokens through `model.generate` (prefill, then decode over static caches, in CUDA
graphs on a GPU unless `--no-cuda-graph`). tokens/s = batch * gen_len / wall time of the whole
`generate` call, prefill included, median over `--repeats` runs after `--warmup` untimed ones. A model that
runs out of GPU memory at one batch size is not tried at larger ones, so a long list of batch sizes sweeps
each model up to what memory holds.

Also printed: each model's peak tokens/s and the ratio of the peaks; on a GPU the peak memory of each run and,
at batch 1, the decode latency (ms per token without the prefill: the time of gen_len tokens minus that of
one, over gen_len - 1) against the weight-read floor (the model's weight bytes over the copy bandwidth
measured in the same run).

With no arguments: small models derived from the 360M presets (d_model 256, 5 Based layers and 4
Transformer layers, the presets' vocabulary) on whatever device exists; a couple of minutes on 2 CPU cores.
A paper-scale run on a GPU:

    python benchmarks/gen_throughput.py --model based-1.3b --batch-sizes 1 16 64 256 --prompt-len 512 \\
        --gen-len 1024 --out gen.json --plot gen.png
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import (DTYPES, attention_kernel, banner, check_out_path, copy_bandwidth, default_device, dtype_name,
                     environment, format_table, median_seconds, write_results)

from based.models import BasedConfig, BasedLM, Transformer, TransformerConfig


def model_configs(name: str) -> tuple[BasedConfig, TransformerConfig]:
    """The Based config `name` and its Transformer++ baseline (presets matched in parameter count)."""
    if name == "tiny":
        # The 360M presets shrunk alike: same head dim (64) and vocabulary, and Based's layer pattern
        # (conv, linear attention, sliding window, conv, conv) once.
        return (BasedConfig.from_preset("based-360m", d_model=256, n_heads=4, n_layers=5,
                                        linear_attention_layers=(1,), sliding_window_layers=(2,)),
                TransformerConfig.from_preset("transformer-360m", d_model=256, n_heads=4, n_layers=4))
    size = name.removeprefix("based-")
    return BasedConfig.from_preset(name), TransformerConfig.from_preset(f"transformer-{size}")


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
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration first")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 3 on a GPU, 1 on CPU)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--out", help="write the results to this .json or .csv file")
    parser.add_argument("--plot", help="save a PNG of tokens/s against batch size (needs matplotlib)")
    args = parser.parse_args(argv)
    for name in ("prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1 or args.warmup < 0 or (args.repeats is not None and args.repeats < 1):
        parser.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
    args.device = args.device or default_device()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype = DTYPES[args.dtype]
    args.repeats = args.repeats or (3 if args.device.type == "cuda" else 1)
    return args


def measure(model, batch: int, args, gen_len: int | None = None) -> tuple[float, float] | None:
    """(seconds, peak GPU MB or None off the GPU) of `model.generate` at this batch size, or None when it runs
    out of GPU memory."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=generator)
    prompt = prompt.to(args.device)
    cuda_graph = False if args.no_cuda_graph else None  # None: on for CUDA, off elsewhere
    on_gpu = args.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(args.device)
    try:
        seconds = median_seconds(lambda: model.generate(prompt, gen_len or args.gen_len, cuda_graph=cuda_graph),
                                 args.device, warmup=args.warmup, repeats=args.repeats)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        peak_mb = torch.cuda.max_memory_allocated(args.device) / 2**20 if on_gpu else None
        if on_gpu:
            torch.cuda.empty_cache()
    return seconds, peak_mb


def decode_latency_ms(model, args) -> float:
    """Batch-1 ms per decoded token, prefill excluded: (t(gen_len) - t(1)) / (gen_len - 1)."""
    full, _ = measure(model, 1, args)
    prefill_and_first, _ = measure(model, 1, args, gen_len=1)
    return 1e3 * (full - prefill_and_first) / max(1, args.gen_len - 1)


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
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens / s", title=title)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarise(rows: list[dict], models: dict, args) -> dict:
    """Each model's peak tokens/s (and its batch), the ratio of the peaks, and on a GPU the batch-1 decode
    latency against the weight-read floor."""
    summary = {}
    for name in models:
        measured = [r for r in rows if r["model"] == name and r["tokens_per_s"]]
        best = max(measured, key=lambda r: r["tokens_per_s"], default=None)
        summary[f"{name} peak tokens/s"] = None if best is None else best["tokens_per_s"]
        summary[f"{name} peak batch"] = None if best is None else best["batch"]
    peaks = [summary[f"{name} peak tokens/s"] for name in ("Based", "Transformer++")]
    summary["Based / Transformer++ peak"] = round(peaks[0] / peaks[1], 2) if all(peaks) else None
    if args.device.type == "cuda" and args.gen_len > 1:
        bandwidth = copy_bandwidth()
        for name, model in models.items():
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            summary[f"{name} batch-1 ms/token"] = round(decode_latency_ms(model, args), 3)
            summary[f"{name} weight-read floor ms"] = round(1e3 * weight_bytes / bandwidth, 3)
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
    kernels = {"Transformer++": attention_kernel(args.device, args.dtype), "Based": "based.ops"}
    graphs = args.device.type == "cuda" and not args.no_cuda_graph
    print(f"model {args.model}, {dtype_name(args.dtype)}, prompt {args.prompt_len}, generating {args.gen_len}, "
          f"CUDA graphs {'on' if graphs else 'off'}; Transformer++ attention: {kernels['Transformer++']}")

    rows, out_of_memory = [], set()
    for batch in args.batch_sizes:
        throughput, peak_mb = {}, {}
        for name, model in models.items():
            result = None if name in out_of_memory else measure(model, batch, args)
            if result is None:
                out_of_memory.add(name)
                throughput[name] = peak_mb[name] = None
            else:
                throughput[name], peak_mb[name] = batch * args.gen_len / result[0], result[1]
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
                "peak_memory_MB": None if peak_mb[name] is None else round(peak_mb[name]),
            })

    print()
    shown = [{**row, "tokens_per_s": "OOM" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.1f}",
              "based_over_transformer": "" if row["based_over_transformer"] is None
              else f"{row['based_over_transformer']:.2f}x",
              "peak_memory_MB": "" if row["peak_memory_MB"] is None else row["peak_memory_MB"]} for row in rows]
    columns = ["model", "attention", "params_M", "batch", "prompt_len", "gen_len", "tokens_per_s",
               "based_over_transformer", "peak_memory_MB"]
    print("\n".join(format_table(shown, columns)))
    summary = summarise(rows, models, args)
    print("\n".join(f"{key}: {value}" for key, value in summary.items()))
    if args.out:
        write_results(args.out, rows, env, summary)
        print(f"wrote {args.out}")
    if args.plot:
        plot(args.plot, rows, f"{args.model}, {env['device']}, prompt {args.prompt_len}, gen {args.gen_len}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
