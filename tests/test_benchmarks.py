"""The benchmark scripts run end to end (tiny sizes) and write what they promise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    # The checkout's `based` first, as the tests import it; the scripts import their helpers by path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_gen_throughput_writes_both_models(tmp_path):
    out = tmp_path / "gen.json"
    result = run_script("gen_throughput.py", "--device", "cpu", "--batch-sizes", "1", "2", "--prompt-len", "5",
                        "--gen-len", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert "device" in results["environment"]
    rows = results["results"]
    assert [(r["model"], r["batch"]) for r in rows] == [("Transformer++", 1), ("Based", 1), ("Transformer++", 2),
                                                        ("Based", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["attention"] == "math" for r in rows if r["model"] == "Transformer++")
    assert all(r["based_over_transformer"] > 0 for r in rows if r["model"] == "Based")


def test_gen_throughput_rejects_bad_output_path_before_running():
    result = run_script("gen_throughput.py", "--out", "results.txt")
    assert result.returncode != 0 and ".json or .csv" in result.stderr


@pytest.mark.parametrize("script", ["sliding_window.py", "decode.py", "train_kernels.py"])
def test_gpu_benchmarks_check_their_output_path_and_need_a_gpu(script):
    result = run_script(script, "--out", "results.txt")
    assert result.returncode != 0 and ".json or .csv" in result.stderr
    if not torch.cuda.is_available():
        result = run_script(script)
        assert result.returncode == 1 and "no CUDA device" in result.stderr


def test_linear_benchmark_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    result = run_script("linear.py")
    assert result.returncode == 1 and "no CUDA device" in result.stderr


@pytest.mark.parametrize("extra", [[], ["--loss", "logits", "--activation-checkpointing"]])
def test_train_throughput_writes_both_models(tmp_path, extra):
    out = tmp_path / "train.json"
    result = run_script("train_throughput.py", "--device", "cpu", "--seqlens", "16", "32", "--tokens-per-step", "64",
                        "--steps", "1", "--warmup", "0", "--out", str(out), *extra)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["T"]) for r in rows] == [("Transformer++", 16), ("Transformer++", 32), ("Based", 16),
                                                    ("Based", 32)]
    assert all(r["tokens_per_s"] > 0 and r["mode"] == "eager" for r in rows)
    assert all(r["based_over_transformer"] > 0 for r in rows if r["model"] == "Based")


def test_train_throughput_compiles_blocks_only_inside_the_step():
    """`--compile-scope blocks` swaps each block for its compiled wrapper while the compiled steps run and puts
    the originals back, so a later eager run is eager (torch.compile is lazy: nothing compiles here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from based.models import BasedLM

    model = BasedLM(train_throughput.model_configs("tiny")[0])
    originals = list(model.transformer.layers)
    with train_throughput.compiled(model, "compiled", "blocks") as forward:
        assert forward is model
        assert all(isinstance(layer, torch._dynamo.eval_frame.OptimizedModule) for layer in model.transformer.layers)
        assert [layer._orig_mod for layer in model.transformer.layers] == originals
    assert list(model.transformer.layers) == originals
    with train_throughput.compiled(model, "eager", "blocks") as forward:
        assert forward is model and list(model.transformer.layers) == originals


def test_train_throughput_rejects_a_length_that_does_not_divide_the_step():
    result = run_script("train_throughput.py", "--device", "cpu", "--seqlens", "48", "--tokens-per-step", "64")
    assert result.returncode != 0 and "divide --tokens-per-step" in result.stderr
