import pytest
import torch
from hypothesis import settings

# Shapes are drawn by hypothesis; each example runs real kernels, so keep the count modest and the deadline off.
settings.register_profile("based", max_examples=25, deadline=None, derandomize=False)
settings.load_profile("based")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_filled_allocations():
    """Fresh allocations (torch.empty) come out NaN, so an output element a kernel forgets to write fails."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
