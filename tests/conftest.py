import os
import zlib

import pytest
import torch
from hypothesis import settings

# Shapes are drawn by hypothesis; each example runs real kernels, so keep the count modest and the deadline off.
# Derandomized in CI (CI=true, set by the CI runner) so a run is a pure function of the code; locally hypothesis
# keeps exploring new examples (`HYPOTHESIS_PROFILE=ci` reproduces CI's).
settings.register_profile("based", max_examples=25, deadline=None, derandomize=False)
settings.register_profile("ci", settings.get_profile("based"), derandomize=True, print_blob=True)
in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if in_ci else "based"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_generators(request):
    """Every test draws from generators seeded by its own name: `torch.randn` without a generator gives the same
    data on every run of that test, alone or in any order with others."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def auto_picks_kernels(monkeypatch):
    """"auto" choosing kernels as it does on a GPU, here too where the interpreter runs them: a reference that
    dispatched through "auto" would then reach a kernel on CPU as well."""
    from based.ops import _backend

    def as_on_gpu(device, implementations, auto_order=("cuda", "triton")):
        usable = [n for n in auto_order if n in implementations and _backend._supported(n, device)]
        return usable[0] if usable else "torch"

    monkeypatch.setattr(_backend, "auto_backend", as_on_gpu)


@pytest.fixture
def nan_filled_allocations():
    """Fresh allocations (torch.empty) come out NaN, so an output element a kernel forgets to write fails."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
