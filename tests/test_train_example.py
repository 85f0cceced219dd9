"""examples/train.py on CPU with two processes (torchrun, gloo, FSDP2): the loss goes down, a run stopped and
resumed from its torch.distributed.checkpoint logs what the uninterrupted run logs, and the final
save_pretrained directory loads and generates."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from based.models import BasedLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "based-360m", "--override", "d_model=64", "n_layers=3", "n_heads=4", "linear_attention_layers=1,",
        "sliding_window_layers=2,", "vocab_size=256", "window=9", "--seqlen", "32", "--batch-size", "2", "--steps", "8",
        "--warmup", "2", "--lr", "3e-3", "--dtype", "float32", "--val-batches", "1"]


def train(tmp_path: Path, *args: str) -> None:
    # CPU and gloo even where GPUs exist: two processes must not need two GPUs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / "train.py"), "--data", str(tmp_path / "corpus.txt"), *TINY, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_two_process_training_resumes_exactly_and_saves_a_loadable_model(tmp_path):
    words = "the quick brown fox jumps over a lazy dog while based models recall keys and values".split()
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))

    train(tmp_path, "--checkpoint-dir", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.jsonl"),
          "--out", str(tmp_path / "final"))
    whole = losses(tmp_path / "a.jsonl")
    assert len(whole) == 8 and whole[-1] < whole[0] - 0.5

    train(tmp_path, "--checkpoint-dir", str(tmp_path / "b"), "--metrics", str(tmp_path / "b.jsonl"), "--stop-after", "4")
    assert len(losses(tmp_path / "b.jsonl")) == 4
    train(tmp_path, "--checkpoint-dir", str(tmp_path / "b"), "--metrics", str(tmp_path / "b.jsonl"), "--resume")
    resumed = losses(tmp_path / "b.jsonl")
    assert len(resumed) == 8
    assert max(abs(a - b) for a, b in zip(resumed, whole)) < 1e-5

    model = BasedLM.from_pretrained(tmp_path / "final")
    prompt = torch.tensor([list(b"the quick ")])
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (1, prompt.shape[1] + 5) and int(out.max()) < 256


def test_tokenizer_json_data_path(tmp_path):
    """With --tokenizer the text goes through the tokenizers library (a word-level tokenizer built here)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = "the quick brown fox jumps over a lazy dog".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    train(tmp_path, "--tokenizer", str(tmp_path / "tokenizer.json"), "--metrics", str(tmp_path / "m.jsonl"))
    assert len(losses(tmp_path / "m.jsonl")) == 8
