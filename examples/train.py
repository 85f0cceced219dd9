"""Train a BasedLM or a Transformer++ on local text, on one device or many (torchrun, FSDP2).

    python examples/train.py --model based-360m --data corpus.txt --seqlen 2048 --batch-size 8 --steps 1000
    torchrun --nproc_per_node 8 examples/train.py --model based-1.3b --data corpus/ --seqlen 2048 \\
        --batch-size 4 --grad-accum 4 --steps 20000 --checkpoint-dir ckpt --out based-1.3b-trained

Data: a text file or a folder of them, read as bytes (byte-level tokens, ids 0..255) or, with `--tokenizer
tokenizer.json`, through the `tokenizers` library; nothing is downloaded. The last `--val-fraction` of the tokens
is held out. Sample n of the run is the window of `--seqlen` tokens at an offset drawn from a generator seeded
with (seed, n), so the data position is one counter and a resumed run reads exactly what the uninterrupted one
would.

One step: `--grad-accum` micro-batches of `--batch-size` sequences per process, the loss from
`model(ids, labels=ids)` (the fused LM-head cross-entropy), gradient clipping, AdamW, a cosine schedule with
linear warmup. Several processes shard the model with FSDP2 (`fully_shard`, bf16 parameters and fp32 gradient
reduction with `--dtype bfloat16`) or replicate it with `--parallel ddp`. `--checkpoint-dir` saves model,
optimizer, scheduler and data position with `torch.distributed.checkpoint` every `--checkpoint-every` steps and
at the end; `--resume` continues from there. `--out` writes a `save_pretrained` directory that
`BasedLM.from_pretrained` / `Transformer.from_pretrained` load. Rank 0 logs step, loss, lr, tokens/s (and on a
GPU its peak memory) to `--metrics` (JSONL) and shows a progress bar when tqdm is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from based.models import BasedConfig, BasedLM, Transformer, TransformerConfig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a preset: based-360m, based-1.3b, transformer-360m, "
                        "transformer-1.3b")
    parser.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config fields to replace, e.g. d_model=256 n_layers=4 linear_attention_layers=1,")
    parser.add_argument("--data", required=True, help="a text file or a folder of text files")
    parser.add_argument("--tokenizer", help="a tokenizer.json (tokenizers library); default: bytes")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch and process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine schedule's floor, over --lr")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="compute dtype (default: bfloat16 on GPUs, float32 on CPU); weights stay fp32")
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="with several processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-dir", help="torch.distributed.checkpoint directory (save and resume)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (checkpointing) after this step, as an interrupted run would")
    parser.add_argument("--val-every", type=int, default=0, help="steps between validations (0: at the end)")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--metrics", help="JSONL file of per-step metrics (rank 0)")
    parser.add_argument("--out", help="save_pretrained directory for the final model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    return args


# ---- model ---------------------------------------------------------------------------------------------------

def build_config(name: str, overrides: list[str]):
    config_class = BasedConfig if name.startswith("based") else TransformerConfig
    fields = {}
    for item in overrides:
        key, _, value = item.partition("=")
        fields[key] = _parse_value(value)
    return config_class.from_preset(name, **fields)


def _parse_value(value: str):
    if "," in value:  # a tuple of ints, e.g. "1,6" or "1,"
        return tuple(int(v) for v in value.split(",") if v)
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def model_class_of(config):
    return BasedLM if isinstance(config, BasedConfig) else Transformer


def wrap(model, args, device, world: int):
    """The model as the step runs it: FSDP2-sharded, DDP-replicated or as is; compiled if asked."""
    compute = args.dtype
    if world > 1 and args.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for block in model.transformer.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


# ---- data ----------------------------------------------------------------------------------------------------

def load_tokens(path: str, tokenizer: str | None) -> torch.Tensor:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise SystemExit(f"--data {path}: no files")
    if tokenizer is None:
        data = b"".join(f.read_bytes() for f in files)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(tokenizer)
    ids = [i for f in files for i in encoder.encode(f.read_text(errors="replace")).ids]
    return torch.tensor(ids, dtype=torch.int64)


def sample(tokens: torch.Tensor, index: int, seqlen: int, seed: int) -> torch.Tensor:
    """Sample `index` of the run: `seqlen` tokens at an offset drawn from a generator seeded with (seed, index)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = int(torch.randint(0, len(tokens) - seqlen + 1, (1,), generator=generator))
    return tokens[start:start + seqlen]


def batch(tokens, first: int, size: int, seqlen: int, seed: int, device) -> torch.Tensor:
    return torch.stack([sample(tokens, first + i, seqlen, seed) for i in range(size)]).to(device)


# ---- schedule ------------------------------------------------------------------------------------------------

def lr_factor(step: int, args) -> float:
    """Linear warmup to 1, then cosine down to --min-lr-ratio at the last step."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- checkpoints ---------------------------------------------------------------------------------------------

def save_checkpoint(args, model, optimizer, scheduler, step: int) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=os.path.join(args.checkpoint_dir, f"step_{step:08d}"))


def load_checkpoint(args, model, optimizer, scheduler) -> int:
    """The step the latest checkpoint was taken after (0 when there is none)."""
    saved = sorted(Path(args.checkpoint_dir).glob("step_*")) if Path(args.checkpoint_dir).is_dir() else []
    if not saved:
        return 0
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(saved[-1]))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save_final(args, model, config, rank: int) -> None:
    """The full model into a `save_pretrained` directory (gathered to rank 0)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = model_class_of(config)(config)
        plain.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in full.items()})
        plain.save_pretrained(args.out)


# ---- the loop ------------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, val_tokens, args, device, rank: int, world: int) -> float:
    """Mean loss over --val-batches fixed windows of the held-out tokens (every rank its share)."""
    losses = []
    for i in range(args.val_batches):
        ids = batch(val_tokens, (i * world + rank) * args.batch_size, args.batch_size, args.seqlen, args.seed + 1,
                    device)
        losses.append(model(ids, labels=ids).float())
    loss = torch.stack(losses).mean()
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return float(loss)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else
                                                                torch.float32)

    tokens = load_tokens(args.data, args.tokenizer)
    n_val = max(args.seqlen, int(len(tokens) * args.val_fraction))
    if len(tokens) < n_val + args.seqlen:
        raise SystemExit(f"--data has {len(tokens)} tokens: too few for --seqlen {args.seqlen} plus validation")
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]

    config = build_config(args.model, args.override)
    torch.manual_seed(args.seed)  # every rank builds the same initial weights
    model = model_class_of(config)(config, device=device)
    model.activation_checkpointing = args.activation_checkpointing
    model = wrap(model, args, device, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    start = load_checkpoint(args, model, optimizer, scheduler) if args.resume else 0
    # FSDP casts parameters itself; a single device or DDP runs the bf16 compute under autocast.
    sharded = world > 1 and args.parallel == "fsdp"
    autocast = (torch.autocast(device.type, dtype=args.dtype) if args.dtype != torch.float32 and not sharded
                else nullcontext())

    if args.metrics and rank == 0:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.metrics, "a") if args.metrics and rank == 0 else None
    progress = range(start, args.steps)
    if rank == 0:
        try:
            from tqdm import tqdm

            progress = tqdm(progress, initial=start, total=args.steps, desc="train")
        except ImportError:
            pass
    per_step = args.batch_size * args.grad_accum * world
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in progress:
        if step >= last:
            break
        began = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            first = step * per_step + (micro * world + rank) * args.batch_size
            ids = batch(train_tokens, first, args.batch_size, args.seqlen, args.seed, device)
            with autocast:
                loss = model(ids, labels=ids) / args.grad_accum
            loss.backward()
            total += loss.detach().float()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        record = {"step": step + 1, "loss": float(total), "lr": lr,
                  "tokens_per_s": per_step * args.seqlen / (time.perf_counter() - began)}
        if device.type == "cuda":
            record["peak_memory_GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if args.val_every and (step + 1) % args.val_every == 0:
            record["val_loss"] = validate(model, val_tokens, args, device, rank, world)
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if args.checkpoint_dir and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args, model, optimizer, scheduler, step + 1)
    done = min(last, args.steps)
    saved_already = args.checkpoint_every and done % args.checkpoint_every == 0
    if args.checkpoint_dir and done > start and not saved_already:
        save_checkpoint(args, model, optimizer, scheduler, done)
    if done == args.steps:
        if not args.val_every:
            val_loss = validate(model, val_tokens, args, device, rank, world)
            if log:
                log.write(json.dumps({"step": done, "val_loss": val_loss,
                                      "val_ppl": math.exp(min(val_loss, 50.0))}) + "\n")
        if args.out:
            save_final(args, model, config, rank)
    if log:
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
