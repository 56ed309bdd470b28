import os

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
