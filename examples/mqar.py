"""Multi-query associative recall (MQAR): recall accuracy against recurrent-state size, Based vs the others.

    python examples/mqar.py                  # the reduced sweep (meant to take minutes on one H100/H200)
    python examples/mqar.py --full           # the sweep of the Zoology / BASED papers
    python examples/mqar.py --smoke          # a few steps on tiny data (what CI runs on CPU)

The task, as the Zoology and BASED papers define it: a sequence starts with kv key-value pairs `k1 v1 k2 v2 ...`
(keys and values each drawn without replacement, keys from [1, 4096), values from [4096, 8192)); later, each key
appears once more as a query at one of the even slots of the rest of the sequence (slot i chosen with probability
proportional to a * i^(a - 1), a = 0.01: queries cluster early), and the model must emit its value next. Only those
positions carry a label; every other position holds a uniformly random token. Accuracy is per example over its
labelled positions, then averaged.

Models (two layers, pre-norm residual with LayerNorm, no MLP, LM head tied to the embedding, no positional
encoding): a BaseConv (kernel 3) then the mixer: Based's Taylor linear attention (1 head, feature dim f), full
softmax attention (a sliding window as long as the longest test sequence), or sliding-window attention of window w;
plus the two ablations the paper discusses: linear attention without the conv, and Based + a sliding-window layer
(three layers). State bytes (fp32) at the longest test length L = 1024, summed over layers: Based d*E + E
(E = 1 + f + f(f+1)/2); attention 2*d*L; window 2*d*w; conv 3*d.

Training, as the papers': batch 256, the training segments in the same order every epoch (unshuffled, so each
epoch ends on the most pairs), AdamW (weight decay 0.1), a cosine schedule over 32 epochs stepped once per epoch,
the best of the learning rates per configuration, an early stop once validation accuracy passes 0.99; fp32 weights,
bf16 autocast on a GPU (`--dtype float32`: fp32 throughout, as the papers train). The reduced sweep: five
configurations, learning rates 1e-3, 3.2e-3 and 1e-2, the first 16 of the 32 epochs (the rate ends at half its
peak). Each (configuration, learning rate) runs as its own job, `--workers` of them at once on the one device, a
line (validation accuracy after each epoch) and a progress bar (tqdm, when installed) as each finishes. Output: a
table (model, config, state bytes, best lr, accuracy per test slice, mean, the paper's mean where it has the point,
the difference), Based minus the sliding window at every pair of states within 2x of each other, `--out` JSON and
`--plot` PNG of mean accuracy against state bytes (log x), one line per model family with the paper's points
beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from based.nn import BaseConv, LinearAttention, SlidingWindowAttention

VOCAB, KEYS_END = 8192, 4096  # keys in [1, 4096), values in [4096, 8192)
POWER_A = 0.01
TEST_LENGTH = 1024
SCHEDULE_EPOCHS = 32  # the papers' epoch budget, over which the learning rate follows its cosine

FULL_TRAIN = [(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]
FULL_TEST = [(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]
LEARNING_RATES = [1e-3, 3.2e-3, 1e-2, 3.2e-2]


# ---- data ----------------------------------------------------------------------------------------------------

def mqar(n: int, length: int, kv: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` examples of `length` tokens with `kv` pairs: (inputs [n, length], labels [n, length], -100 where none)."""
    if 4 * kv > length + 1:
        raise ValueError(f"{kv} pairs and their queries do not fit {length} tokens")
    chunks = [_mqar_chunk(min(4096, n - i), length, kv, generator) for i in range(0, n, 4096)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def _mqar_chunk(n: int, length: int, kv: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, VOCAB, (n, length + 1), generator=generator)
    keys = torch.argsort(torch.rand(n, KEYS_END - 1, generator=generator), dim=1)[:, :kv] + 1
    values = torch.argsort(torch.rand(n, VOCAB - KEYS_END, generator=generator), dim=1)[:, :kv] + KEYS_END
    seq[:, 0:2 * kv:2], seq[:, 1:2 * kv:2] = keys, values
    # Query slots: the even positions after the pairs, slot i (1-based) weighted a * i^(a - 1).
    slots = (length + 1 - 2 * kv) // 2
    weights = POWER_A * torch.arange(1, slots + 1, dtype=torch.float64) ** (POWER_A - 1)
    chosen = torch.multinomial(weights.expand(n, slots), kv, replacement=False, generator=generator)
    # Where each key is asked. Its value is only the label (the input after the query stays random), so the query
    # region holds no key-value pair to copy from.
    query_pos = 2 * kv + 2 * chosen
    seq.scatter_(1, query_pos, keys)
    targets = torch.full_like(seq, -100)
    targets.scatter_(1, query_pos + 1, values)
    return seq[:, :-1], targets[:, 1:]


# ---- models --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str  # "based", "attention", "sliding window", "linear attention (no conv)", "based + window"
    d_model: int
    feature_dim: int = 16
    window: int = 0

    @property
    def name(self) -> str:
        extra = {"based": f"f={self.feature_dim}", "linear attention (no conv)": f"f={self.feature_dim}",
                 "based + window": f"f={self.feature_dim}, w={self.window}", "sliding window": f"w={self.window}",
                 "attention": ""}[self.family]
        return f"d={self.d_model}" + (f", {extra}" if extra else "")

    def layers(self) -> list[str]:
        return {"based": ["conv", "linear"], "attention": ["conv", "attention"], "sliding window": ["conv", "window"],
                "linear attention (no conv)": ["linear"], "based + window": ["conv", "linear", "window"]}[self.family]

    def state_bytes(self) -> int:
        d, f = self.d_model, self.feature_dim
        E = 1 + f + f * (f + 1) // 2
        per_layer = {"conv": 3 * d, "linear": d * E + E, "attention": 2 * d * TEST_LENGTH,
                     "window": 2 * d * self.window}
        return 4 * sum(per_layer[layer] for layer in self.layers())


# Mean accuracies read off the BASED paper's MQAR plot (about +-0.02), for the table's comparison column.
PUBLISHED = {
    ModelSpec("sliding window", 128, window=64): 0.52, ModelSpec("sliding window", 128, window=128): 0.66,
    ModelSpec("sliding window", 128, window=1024): 1.0, ModelSpec("based", 64, 16): 0.91,
    ModelSpec("based", 128, 16): 0.985, ModelSpec("based", 128, 24): 0.99, ModelSpec("attention", 64): 1.0,
}


class RecallModel(nn.Module):
    """Embedding, pre-norm residual mixers (no MLP), final norm, LM head tied to the embedding, as the papers'
    models: LayerNorm (with RMSNorm instead, Based recalls markedly worse at lengths beyond training:
    docs/MQAR.md), no positions but what the convolution gives (the attention layers are not rotated), weights
    drawn from N(0, 0.02), output projections scaled down by sqrt(2 * layers)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d = spec.d_model
        self.embedding = nn.Embedding(VOCAB, d)

        def mixer(kind: str) -> nn.Module:
            if kind == "conv":
                return BaseConv(d, expand_proj=2, kernel_size=3)
            if kind == "linear":
                return LinearAttention(d, num_heads=1, feature_dim=spec.feature_dim)
            window = TEST_LENGTH if kind == "attention" else spec.window
            return SlidingWindowAttention(d, num_heads=1, window=window, rotary_base=None)

        self.mixers = nn.ModuleList(mixer(kind) for kind in spec.layers())
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in spec.layers())
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.embedding.weight
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(self.mixers)))
            elif p.dim() == 2:  # embedding and projections; the conv filters and norms keep their defaults
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]; with `where` (row and column indices) only at those positions, [N, vocab]. MQAR
        scores only its query positions, a fifth of the tokens or fewer, and the head over every token would be
        most of a step's work."""
        x = self.embedding(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        x = self.final_norm(x)
        return self.head(x if where is None else x[where])


# ---- training ------------------------------------------------------------------------------------------------

def mixed_precision(device: torch.device, dtype: str):
    """Autocast to `dtype` (`--dtype`: bf16 on a GPU by default, where the tensor cores and the Hopper
    linear-attention kernels take it), or plain fp32."""
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def accuracy(model, inputs, targets, batch_size: int, dtype: str) -> float:
    """Mean over examples of the fraction of labelled positions predicted right."""
    scores = []
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        labelled = y != -100
        where = labelled.nonzero(as_tuple=True)
        with mixed_precision(x.device, dtype):
            hit = torch.zeros_like(labelled)
            hit[where] = model(x, where).argmax(-1) == y[where]
        scores.append(hit.sum(1) / labelled.sum(1))
    return float(torch.cat(scores).mean())


def train_one(spec: ModelSpec, lr: float, train_sets, val_sets, args, device) -> tuple[list[float], RecallModel]:
    """(validation accuracy after each epoch, the model at its best) for one configuration and learning rate."""
    torch.manual_seed(args.seed)
    model = RecallModel(spec).to(device)
    # Each batch with its labelled positions (indices found once here, not in every step) and their labels, in
    # the order of the training mix, every epoch the same (the papers' loader does not shuffle; docs/MQAR.md).
    batches = []
    for x, y in train_sets:
        for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size)):
            where = (yb != -100).nonzero(as_tuple=True)
            batches.append((xb, where, yb[where]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(SCHEDULE_EPOCHS, args.epochs))
    history, best_state = [], None
    for _ in range(args.epochs):
        model.train()
        for x, where, labels in batches:
            with mixed_precision(device, args.dtype):
                logits = model(x, where)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        model.eval()
        score = sum(accuracy(model, x, y, args.batch_size, args.dtype) for x, y in val_sets) / len(val_sets)
        if score > max(history, default=-1.0):
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        history.append(score)
        if score > 0.99:
            break
    model.load_state_dict(best_state)
    return history, model


def run_job(job) -> dict:
    """Train one (configuration, learning rate) and score it on every test slice. The test slices are also the
    validation data that picks the epoch and the learning rate, as in the papers."""
    spec, lr, train_sets, test_sets, args = job
    device = torch.device(args.device)
    started = time.perf_counter()
    train_sets = [(x.to(device), y.to(device)) for x, y in train_sets]
    test_sets = {key: (x.to(device), y.to(device)) for key, (x, y) in test_sets.items()}
    history, model = train_one(spec, lr, train_sets, list(test_sets.values()), args, device)
    test = {f"L{L} kv{kv}": round(accuracy(model, x, y, args.batch_size, args.dtype), 4)
            for (L, kv), (x, y) in test_sets.items()}
    return {"spec": spec, "lr": lr, "val": max(history), "history": [round(h, 4) for h in history], "test": test,
            "seconds": time.perf_counter() - started}


def with_progress(results, total: int):
    """The finished jobs as they come, each announced in a line, under a progress bar when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, desc="jobs", unit="job") if tqdm else None
    write = bar.write if bar else print
    for result in results:
        by_epoch = " ".join(f"{h:.2f}" for h in result["history"])
        write(f"done: {result['spec'].family} {result['spec'].name} lr {result['lr']:g}: validation "
              f"{result['val']:.3f} ({result['seconds']:.0f} s; by epoch {by_epoch})")
        if bar:
            bar.update()
        yield result
    if bar:
        bar.close()


def sweep_specs(full: bool, smoke: bool) -> list[ModelSpec]:
    if smoke:
        return [ModelSpec("based", 16, feature_dim=4), ModelSpec("sliding window", 16, window=4)]
    if not full:
        return [ModelSpec("based", 64, 16), ModelSpec("based", 128, 16), ModelSpec("attention", 64),
                ModelSpec("sliding window", 128, window=64), ModelSpec("sliding window", 128, window=256)]
    specs = [ModelSpec("based", d, f) for d in (48, 64, 128) for f in (8, 16, 24)]
    specs += [ModelSpec("attention", d) for d in (64, 128)]
    specs += [ModelSpec("sliding window", 128, window=w) for w in (8, 16, 32, 64, 128, 256, 512, 1024)]
    specs += [ModelSpec("linear attention (no conv)", d, 16) for d in (64, 128)]
    specs += [ModelSpec("based + window", d, 16, window=64) for d in (64, 128)]
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the papers' sweep (configs, data, learning rates)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data")
    parser.add_argument("--epochs", type=int, default=None, help="default: 32 full, 16 reduced, 1 smoke")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="compute dtype: bf16 autocast (default on GPUs) or fp32 throughout (default on CPU, and "
                        "the papers'); weights stay fp32")
    parser.add_argument("--workers", type=int, default=None,
                        help="jobs run at once, each its own process on the device (default: on a GPU one per job, "
                        "up to the CPU count; 1 on CPU)")
    parser.add_argument("--out", help="write the results to this .json file")
    parser.add_argument("--plot", help="save a PNG of mean accuracy against state bytes (needs matplotlib)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.smoke:
        train_mix, test_mix, lrs = [(16, 2, 64)], [(16, 2), (32, 4)], [3e-3]
    elif args.full:
        train_mix, test_mix, lrs = FULL_TRAIN, FULL_TEST, LEARNING_RATES
    else:  # the papers' data, three learning rates, half the epochs
        train_mix, test_mix, lrs = FULL_TRAIN, FULL_TEST, LEARNING_RATES[:3]
    args.epochs = args.epochs or (1 if args.smoke else 32 if args.full else 16)
    test_n = 16 if args.smoke else 1000

    generator = torch.Generator().manual_seed(args.seed)
    train_sets = [mqar(n, L, kv, generator) for L, kv, n in train_mix]
    test_sets = {(L, kv): mqar(test_n, L, kv, generator) for L, kv in test_mix}

    # Every (configuration, learning rate) is a job; the models are tiny, so several run at once on one device.
    specs = sweep_specs(args.full, args.smoke)
    jobs = [(spec, lr, train_sets, test_sets, args) for spec in specs for lr in lrs]
    args.workers = args.workers or (min(len(jobs), os.cpu_count() or 1) if device.type == "cuda" else 1)
    if args.workers > 1:
        with torch.multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = list(with_progress(pool.imap_unordered(run_job, jobs), len(jobs)))
    else:
        results = list(with_progress(map(run_job, jobs), len(jobs)))
    rows = []
    for spec in specs:
        best = max((r for r in results if r["spec"] == spec), key=lambda r: r["val"])
        row = {"model": spec.family, "config": spec.name, "state_bytes": spec.state_bytes(), "best_lr": best["lr"],
               **best["test"]}
        row["mean"] = round(sum(best["test"].values()) / len(best["test"]), 4)
        row["published"] = PUBLISHED.get(spec, "")
        row["vs published"] = f"{row['mean'] - PUBLISHED[spec]:+.3f}" if spec in PUBLISHED else ""
        rows.append(row)
        print(f"{spec.family:28s} {spec.name:18s} {row['state_bytes']:>10,d} B  mean {row['mean']:.3f}  "
              f"(lr {best['lr']:g}, {best['seconds']:.0f} s)", flush=True)

    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))
    for line in based_against_window(rows):
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            jobs_run = [{"model": r["spec"].family, "config": r["spec"].name, "lr": r["lr"],
                         "seconds": round(r["seconds"]), "validation by epoch": r["history"]} for r in results]
            json.dump({"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "results": rows,
                       "jobs": jobs_run}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


def based_against_window(rows: list[dict]) -> list[str]:
    """Based's mean accuracy minus the sliding window's, for every pair of points whose states are within 2x of
    each other: the recall gap at comparable memory that the papers report (>= 0.19 in their sweep)."""
    lines = []
    for based in (r for r in rows if r["model"] == "based"):
        for window in (r for r in rows if r["model"] == "sliding window"):
            states = based["state_bytes"], window["state_bytes"]
            if max(states) <= 2 * min(states):
                gap = based["mean"] - window["mean"]
                lines.append(f"based {based['config']} ({based['state_bytes']:,d} B) - sliding window "
                             f"{window['config']} ({window['state_bytes']:,d} B): {gap:+.3f}")
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["state_bytes"], r["mean"]) for r in rows if r["model"] == family)
        line, = ax.plot(*zip(*points), marker="o", label=family)
        published = sorted((spec.state_bytes(), acc) for spec, acc in PUBLISHED.items() if spec.family == family)
        if published:
            ax.plot(*zip(*published), marker="x", linestyle="none", color=line.get_color())
    ax.set_title("x: the BASED paper's points", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("recurrent state at L=1024 (bytes, fp32)")
    ax.set_ylabel("MQAR accuracy (mean over test slices)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
