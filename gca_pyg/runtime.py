"""Where and how a model runs: the device, the precision and memory format policy, deterministic
kernels, and process-level tuning of memory on the CPU.

Device and precision. :func:`resolve_device` turns ``train.device`` into a device;
:func:`autocast_dtype` and :func:`use_channels_last` turn ``train.precision`` and
``train.memory_format`` into what measured fastest there (:func:`native_bf16` says where bf16 runs
in hardware); :func:`use_deterministic_algorithms` is ``train.deterministic``.

Memory. PyTorch allocates every large activation afresh. glibc's malloc serves large blocks with
``mmap`` and returns freed memory to the system, so each training step page-faults its activations
in again (zero-filled by the kernel), a sizeable share of a CPU step with GCA-HNG's O(N²·D) edge
tensors (``benchmarks/bench_step.py --malloc system retain`` measures both settings). Keeping freed
memory for reuse removes it, at the price of a process that holds on to its peak memory. When the
blocks change size from step to step (a sparse batch graph's edge count varies), the kept memory
fragments and grows; :class:`FreedMemoryLimit` hands it back to the system when it has grown too
far.
"""

import ctypes
import os
import sys
from functools import lru_cache
from typing import Optional

import torch

from gca_pyg.errors import ConfigError, warn

__all__ = [
    "resolve_device",
    "autocast_dtype",
    "use_channels_last",
    "use_deterministic_algorithms",
    "native_bf16",
    "retain_freed_memory",
    "FreedMemoryLimit",
]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse (no ``mmap`` blocks, no trimming).

    Affects allocations made after the call. Does nothing (returns False) off Linux/glibc, or when
    the environment variable ``GCA_PYG_MALLOC=system`` asks to leave malloc alone.
    """
    if os.environ.get("GCA_PYG_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    global _retaining
    _retaining = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _retaining


_retaining = False


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FreedMemoryLimit:
    """Keeps the memory that :func:`retain_freed_memory` holds within `ratio` × the process's
    resident memory after its first step.

    Call :meth:`check` after every training step. The first call takes the reference; a later one
    that finds the process grown past `ratio` times it returns the freed memory to the system
    (glibc's ``malloc_trim``, a fraction of a second; the next step page-faults it in again). If
    live memory itself has grown past the limit, the reference moves up to it. Does nothing when
    freed memory is not being retained.
    """

    def __init__(self, ratio: float = 1.25):
        if ratio <= 1.0:
            raise ValueError(f"FreedMemoryLimit needs a ratio above 1, got {ratio}")
        self.ratio = ratio
        self.reference: Optional[int] = None
        self.releases = 0

    def check(self) -> bool:
        """Returns True if it handed freed memory back."""
        if not _retaining:
            return False
        resident = _resident_bytes()
        if self.reference is None:
            self.reference = resident
            return False
        if resident <= self.ratio * self.reference:
            return False
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.releases += 1
        resident = _resident_bytes()
        if resident > self.ratio * self.reference:  # live memory itself has grown
            self.reference = resident
        return True


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo). Other CPUs emulate bf16, many times slower
    than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    return frozenset()


def use_deterministic_algorithms(enabled: bool = True):
    """Turns PyTorch's deterministic kernels on or off (``train.deterministic``).

    On the CPU GCA-HNG's step repeats bit for bit without them. On CUDA, sums by atomic adds (the
    scatters of message passing and the backward of gathers) vary in their last bits from run to
    run; the deterministic kernels sort instead, at some cost in speed. cuBLAS needs a fixed
    workspace for it (``CUBLAS_WORKSPACE_CONFIG``), which is set here unless already set; it
    takes effect only if no CUDA matrix product ran in this process before.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda``/``cuda:N`` must exist.

    Raises:
        ConfigError: If CUDA is asked for where torch sees none, or the index is out of range.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is '{spec}' but torch sees no CUDA device here "
                f"(torch {torch.__version__}); use --set train.device=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device is '{spec}' but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; use --set train.device=cuda:0"
            )
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.precision`` on `device` (None: fp32). ``auto`` is what measured
    fastest for the whole step (``benchmarks/bench_step.py --backbone``): bf16 where `device` has
    native bf16 (CUDA with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere. An explicit bf16
    without native support runs, with a warning."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    if precision == "fp32":
        return None
    if not native_bf16(device):
        warn(
            f"train.precision is bf16 but this {device.type.upper()} has no native bf16 matmul "
            "(no AVX512-BF16/AMX): expect it to run many times slower than fp32"
        )
    return torch.bfloat16


def use_channels_last(memory_format: str, precision: str, device: torch.device) -> bool:
    """Whether a backbone runs in channels_last memory format: ``train.memory_format``, where
    ``auto`` is what measured fastest for the whole step (``benchmarks/bench_step.py
    --backbone``): channels_last with bf16 autocast on a CPU (oneDNN's fast bf16 layout),
    contiguous otherwise (in fp32 on a CPU, and on CUDA in either dtype)."""
    if memory_format == "auto":
        bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
        return device.type == "cpu" and bf16
    return memory_format == "channels_last"
