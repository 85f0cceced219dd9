"""Optional CUDA build. Package metadata lives in pyproject.toml; this file only decides about `based._C`.

`based._C` (C++ host code in csrc/, device code in kernels/) is built when the torch that this script can
import is a CUDA build and nvcc is found. BASED_BUILD_CUDA=1 forces the build and fails with the reason if
it cannot be done; BASED_BUILD_CUDA=0 skips it. Without the extension the pure-Python package installs and
every op runs through its PyTorch (and, on GPUs, Triton) paths.

pip's default build isolation builds in a fresh environment without torch, so a plain `pip install .`
always gives the pure-Python package; `pip install --no-build-isolation .` builds against the installed
torch (which is what the README tells GPU users to run).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

# Ampere and Hopper cubins, plus Hopper PTX so newer GPUs can JIT-compile the kernels; with the Hopper kernels
# (kernels/sm90/, wgmma) also sm_90a, the only target that has those instructions.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
HOPPER_ARCH_LIST = "8.0;9.0a;9.0+PTX"


def _forced() -> bool | None:
    """BASED_BUILD_CUDA as True (force), False (skip) or None (decide from the toolchain)."""
    value = os.environ.get("BASED_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"based: BASED_BUILD_CUDA must be 0 or 1, got {value!r}")


def _cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else the one that owns the nvcc on PATH.

    torch guesses the root as the parent of nvcc's folder, which is wrong when nvcc on PATH is a wrapper
    script (e.g. /usr/local/bin/nvcc); a root only counts if it has both nvcc and the runtime headers.
    """
    def complete(root):
        return (os.path.isfile(os.path.join(root, "bin", "nvcc"))
                and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")))

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if complete(explicit) else None
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    return next((root for root in candidates if complete(root)), None)


def _cutlass_include() -> str | None:
    """CUTLASS/CuTe headers for the Hopper kernels: $CUTLASS_PATH/include, else the `nvidia-cutlass` wheel's copy
    (`cutlass_library/source/include`), else None."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(os.path.join(os.environ["CUTLASS_PATH"], "include"))
    try:
        import cutlass_library
        roots.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    return next((r for r in roots if os.path.isfile(os.path.join(r, "cute", "tensor.hpp"))), None)


def _why_not_buildable() -> str | None:
    """None when the extension can be built here, else why not."""
    try:
        import torch
    except ImportError:
        return ("torch is not importable in the build environment "
                "(install torch first, then `pip install --no-build-isolation .`)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _cuda_home() is None:
        return "no CUDA toolkit found (nvcc and cuda_runtime_api.h; set CUDA_HOME or put nvcc on PATH)"
    return None


def _extension_args() -> dict:
    forced = _forced()
    if forced is False:
        print("based: CUDA extension based._C skipped (BASED_BUILD_CUDA=0); installing the pure-Python package")
        return {}
    reason = _why_not_buildable()
    if reason is not None:
        if forced:
            sys.exit(f"based: BASED_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"based: CUDA extension based._C skipped: {reason}; installing the pure-Python package")
        return {}

    cutlass = _cutlass_include()
    # torch reads both at import time of cpp_extension, so set them first.
    os.environ["CUDA_HOME"] = _cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", HOPPER_ARCH_LIST if cutlass else DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # setuptools wants source paths relative to this file's folder, which is pip's working directory.
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=here)) + sorted(glob.glob("kernels/*.cu", root_dir=here))
    include_dirs = [os.path.join(here, "csrc")]
    nvcc_flags = ["-O3", "-lineinfo"]
    if cutlass is None:
        print("based: Hopper kernels (kernels/sm90/) skipped: no CUTLASS headers "
              "(pip install nvidia-cutlass, or set CUTLASS_PATH)")
    else:
        sources += sorted(glob.glob("csrc/sm90/*.cpp", root_dir=here))
        sources += sorted(glob.glob("kernels/sm90/*.cu", root_dir=here))
        include_dirs.append(cutlass)
        nvcc_flags += ["--expt-relaxed-constexpr", "-std=c++17"]
        print(f"based: Hopper kernels built with the CUTLASS headers in {cutlass}")
    print(f"based: building based._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    extension = CUDAExtension(
        name="based._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_args())
