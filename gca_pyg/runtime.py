"""Process-level tuning for training on the CPU.

PyTorch allocates every large activation afresh. glibc's malloc serves large blocks with ``mmap``
and returns freed memory to the system, so each training step page-faults its activations in again
(zero-filled by the kernel): with GCA-HNG's O(N²·D) edge tensors that costs 10–35% of a step on
the CPU (``benchmarks/bench_step.py`` measures both settings). Keeping freed memory for reuse removes
it, at the price of a process that holds on to its peak memory.
"""
import ctypes
import os
import sys

__all__ = ["retain_freed_memory"]

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
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
