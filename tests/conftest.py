import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU-only machines (CI); it is read at kernel
    # definition, so it must be set before fp4compile (which defines them) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` on machines without a GPU (CI is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A fresh generator per test, seeded from the test's id.

    Every run draws the same numbers for the same test, whatever the order or selection of tests,
    so a failure in CI reproduces locally with the same command.
    """
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
