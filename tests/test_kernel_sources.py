"""The Hopper device code compiles where nvcc and the CUTLASS headers are (CI has both; no GPU needed).

The GPU tests run these kernels; this catches a compile error in kernels/sm90/ on a machine without a GPU,
for the sm_90a target the build uses.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cutlass_include() -> str | None:
    """Where setup.py would find the CUTLASS headers ($CUTLASS_PATH/include, else the nvidia-cutlass wheel)."""
    roots = [os.path.join(os.environ["CUTLASS_PATH"], "include")] if os.environ.get("CUTLASS_PATH") else []
    try:
        import cutlass_library

        roots.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    return next((r for r in roots if os.path.isfile(os.path.join(r, "cute", "tensor.hpp"))), None)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(cutlass_include() is None, reason="no CUTLASS headers (pip install nvidia-cutlass)")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "kernels" / "sm90").glob("*.cu")))
def test_hopper_kernel_compiles(source, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=sm_90a",
           "-I", cutlass_include(), "-c", str(ROOT / "kernels" / "sm90" / source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    # ptxas says so when it serialises the kernel's wgmma instructions (C7519/C7520: a register operand or
    # accumulator it could not prove safe), which costs the overlap the kernels are built around.
    losses = [line for line in result.stderr.splitlines() if "Potential Performance Loss" in line]
    assert not losses, "\n".join(losses[:4])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
@pytest.mark.skipif(cutlass_include() is None, reason="no CUTLASS headers (pip install nvidia-cutlass)")
def test_hopper_shared_memory_addressing(tmp_path):
    """The kernels' 32-bit shared addresses (buffer + smem_offset) are the bytes CuTe's tensors address, and the
    z-sum's ldmatrix rows give mma.sync its A fragment: a host program over the kernels' own layouts."""
    binary = tmp_path / "sm90_layouts"
    cmd = ["nvcc", "-std=c++17", "-O0", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=sm_90a",
           "-I", cutlass_include(), "-I", str(ROOT / "kernels" / "sm90"), str(ROOT / "tests" / "sm90_layouts.cu"),
           "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:]
