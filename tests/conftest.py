import os

import numpy as np
import pytest
import torch
from PIL import Image

# cuBLAS reads its workspace size once, at its first matrix product in the process: fixed here so
# that the tests which turn deterministic kernels on can do so on CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Tests that take the `device` fixture run on the CPU and, where present, on CUDA; the CUDA runs
# carry the `cuda` marker, so `pytest -m cuda` runs exactly them (benchmarks/gpu_check.py does).
DEVICES = [pytest.param(torch.device("cpu"), id="cpu")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def deterministic():
    """Deterministic kernels for the test (``train.deterministic``): CUDA's atomic-add sums vary
    in their last bits between runs without them. Ops that have none warn."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def two_threads():
    """The thread count the expected values were computed with: CPU kernels split their sums by
    thread, so the last bits depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """8 classes × 8 small PNGs, one folder per class (the `folder` dataset)."""
    root = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    for c in range(8):
        (root / f"class{c}").mkdir()
        base = generator.integers(0, 255, size=3)
        for i in range(8):
            pixels = np.clip(base + generator.normal(0, 25, size=(32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
