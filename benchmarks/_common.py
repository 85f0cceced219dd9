"""What every benchmark script shares: the environment banner, timing, dtype names, result files."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# --dtype spellings accepted by the scripts.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict[str, str]:
    """Where the numbers come from: always printed with them, and stored with the results."""
    from based.ops._backend import cuda_extension_available, triton_available

    env = {"python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["device"] = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    if triton_available():
        import triton

        env["triton"] = triton.__version__
    env["based._C"] = "built" if cuda_extension_available() else "not built"
    if os.environ.get("TRITON_INTERPRET") == "1":
        env["TRITON_INTERPRET"] = "1"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return f"{platform.machine()} CPU"


def banner(env: dict[str, str]) -> str:
    return " | ".join(f"{key} {value}" for key, value in env.items())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
                   setup: Callable[[], object] | None = None) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed ones; `setup()`, when given,
    runs untimed before each timed run (e.g. to restore state the run consumes).

    Wall time around a device synchronisation, not CUDA events: generation includes host work (sampling,
    the Python loop) that a user waits for too.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(path: str, rows: list[dict], env: dict[str, str], summary: dict | None = None) -> None:
    """`rows` (dicts with the same keys) to `path`: JSON with the environment (and `summary`), or CSV of the
    rows alone; see `check_out_path`."""
    if Path(path).suffix.lower() == ".json":
        document = {"environment": env, "results": rows, **({"summary": summary} if summary else {})}
        Path(path).write_text(json.dumps(document, indent=2) + "\n")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def check_out_path(path: str | None) -> None:
    """Fail before a long run, not after it, when the result file cannot be written."""
    if path is not None and Path(path).suffix.lower() not in (".json", ".csv"):
        raise SystemExit(f"--out must end in .json or .csv, got {path!r}")


def format_table(rows: list[dict], columns: list[str]) -> list[str]:
    """Rows as aligned text lines (header, rule, rows)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]


def attention_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel the Transformer++ baseline runs here: flash_attn, SDPA-flash or math."""
    from based.models.transformer import attention_backend_name

    return attention_backend_name(device, dtype)


def fa2_causal():
    """(name, fn): FlashAttention-2 causal attention on [B, T, H, D] tensors, from flash_attn when importable,
    else PyTorch SDPA's FLASH_ATTENTION backend (the same FlashAttention-2 code)."""
    try:
        from flash_attn import flash_attn_func

        return "flash_attn", lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    except ImportError:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                    is_causal=True).transpose(1, 2)

        return "SDPA-flash", sdpa


def gpu_ms(fn, inputs, *, backward: bool) -> float:
    """Median GPU time (CUDA events, `triton.testing.do_bench`) of `fn(*inputs)`, with a backward pass of a
    random output gradient when `backward`. The inputs' gradients are reset to None before each run, as a
    training step's `zero_grad()` does, so no gradient-accumulation kernel is timed."""
    import triton.testing

    grad = torch.randn_like(fn(*inputs)) if backward else None

    def run():
        out = fn(*inputs)
        if backward:
            out.backward(grad)

    return triton.testing.do_bench(run, warmup=25, rep=100, grad_to_none=list(inputs) if backward else None,
                                   return_mode="median")


def graph_ms(fn) -> float:
    """Median GPU time of `fn()` replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`): decode-sized
    work, where host launch overhead would otherwise be what is timed. One eager call first, so compilation
    and one-time allocations happen outside the capture."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def gpu_missing(script: str) -> bool:
    """Whether there is no CUDA device for a benchmark that times GPU kernels (saying so on stderr)."""
    if torch.cuda.is_available():
        return False
    print(f"{script} times GPU kernels; no CUDA device here.", file=sys.stderr)
    return True


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth: bytes read + written per second (1 GiB buffers)."""
    import triton.testing

    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * 2 / (copy_ms * 1e-3)


def ceilings():
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s)."""
    import triton.testing

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return copy_bandwidth(), 2 * 8192**3 / (mm_ms * 1e-3)


def model_configs(name: str):
    """(BasedConfig, TransformerConfig): the Based config `name` and its Transformer++ baseline (presets matched
    in parameter count); "tiny" shrinks the 360M presets alike (same head dim 64 and vocabulary, Based's layer
    pattern conv, linear attention, sliding window, conv, conv once) for CPU runs."""
    from based.models import BasedConfig, TransformerConfig

    if name == "tiny":
        return (BasedConfig.from_preset("based-360m", d_model=256, n_heads=4, n_layers=5,
                                        linear_attention_layers=(1,), sliding_window_layers=(2,)),
                TransformerConfig.from_preset("transformer-360m", d_model=256, n_heads=4, n_layers=4))
    size = name.removeprefix("based-")
    return BasedConfig.from_preset(name), TransformerConfig.from_preset(f"transformer-{size}")
