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
