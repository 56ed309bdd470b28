"""Shared helpers of the benchmark scripts: device choice, the machine's matmul peak, peak memory,
isolated measurements in child processes, and table printing."""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gca_pyg.runtime import native_bf16

__all__ = ["native_bf16"]  # re-exported: the benchmarks ask the library's one predicate


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def matmul_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """This machine's practical matmul peak: the best of `repeats` timed square matmuls, GFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def total_memory_mb() -> float:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def available_memory_mb() -> float:
    """Memory available to a new process now (``MemAvailable``; all of it where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return total_memory_mb()


class MemoryGuard:
    """Skips benchmark rows that would not fit in this machine's memory.

    A row's peak memory is foreseen from the last measured row of the same kind, in proportion to
    its size (e.g. its edge count, which the edge tensors grow with); a row without a measured
    predecessor is run. The limit is a share of the memory available when the guard is made (on
    a machine that others share, less than its total)."""

    def __init__(self, share: float = 0.8):
        self.limit_mb = share * min(total_memory_mb(), available_memory_mb())
        self.mb_per_unit: dict[str, float] = {}

    def foresee_mb(self, size: float, kind: str = "") -> Optional[float]:
        """Foreseen peak MB of a row of `size`, or None before any row of `kind` was measured."""
        per_unit = self.mb_per_unit.get(kind)
        return None if per_unit is None else per_unit * size

    def too_big(self, size: float, kind: str = "") -> Optional[str]:
        """Why a row of `size` is skipped (its foreseen memory), or None if it is run."""
        foreseen = self.foresee_mb(size, kind)
        if foreseen is None or foreseen <= self.limit_mb:
            return None
        return f"about {foreseen / 1024:.0f} GiB, limit {self.limit_mb / 1024:.0f}"

    def record(self, size: float, peak_mb: float, kind: str = ""):
        self.mb_per_unit[kind] = peak_mb / size


def load_average() -> str:
    """The 1-minute load average and the number of CPUs, as text."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def time_steps(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time in milliseconds of `repeats` calls of `step`."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_step(step: Callable[[], None], device: torch.device, repeats: int) -> dict[str, float]:
    """Median time, peak memory above what existed before, and matmul GFLOP of `step`.

    The first call counts FLOPs and doubles as the warm-up; `repeats` timed calls follow. On the
    CPU, peak memory is the rise of this process's peak resident set.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_mb = peak_rss_mb()
    with FlopCounterMode(display=False) as counter:
        step()
    ms = time_steps(step, device, repeats)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = peak_rss_mb() - baseline_mb
    return {"ms": ms, "peak_mb": peak_mb, "gflop": counter.get_total_flops() / 1e9}


MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv")


class OperatorTimer(TorchDispatchMode):
    """Wall time of every ATen operator run under it, by (operator, first input's shape and
    dtype), timed where it is dispatched (CPU only: CUDA operators return before they finish).

    Unlike torch.profiler it adds nothing inside an operator, whose own time it measures; only
    the Python between operators grows. ``only`` restricts the timing to some operator names.
    """

    def __init__(self, only: Optional[Sequence[str]] = None):
        super().__init__()
        self.only = None if only is None else frozenset(only)
        self.calls: dict[tuple[str, str], list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.only is not None and name not in self.only:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        shape = "" if first is None else f"{list(first.shape)} {str(first.dtype)[6:]}"
        entry = self.calls.setdefault((name, shape), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        return out

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.calls.values())


def matmul_ms(step: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    """Milliseconds that one call of `step` spends inside matrix products (median of `repeats`).

    With the GFLOP of :func:`measure_step` this gives the rate of the matmuls themselves, apart
    from the elementwise work, casts and Python around them. On the CPU every matmul is timed
    where it is dispatched (:class:`OperatorTimer`); on CUDA it is the kernel time torch.profiler
    records under each matmul operator.
    """
    if device.type == "cuda":
        return _cuda_matmul_ms(step)
    times = []
    for _ in range(repeats):
        with OperatorTimer(only=MATMUL_OPS) as timer:
            step()
        times.append(timer.seconds * 1e3)
    return statistics.median(times)


def _cuda_matmul_ms(step: Callable[[], None]) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {f"aten::{name}" for name in MATMUL_OPS}
    return (
        sum(
            e.device_time_total
            for e in prof.events()
            if e.name in names and not (e.cpu_parent and e.cpu_parent.name in names)
        )
        / 1e3
    )


def measure_in_child(script: str, config: dict, timeout: float = 3600) -> dict:
    """Runs `script --child JSON` in a fresh interpreter, so that its peak memory is its own.

    The child imports gca_pyg from this checkout even when it is not installed. Returns the JSON
    object the child printed last, or {"error": ...}.
    """
    command = [sys.executable, script, "--child", json.dumps(config)]
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": python_path, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {result.returncode}: {tail}"}
    return json.loads(lines[-1])


def print_table(header: Sequence[str], rows: list[Sequence]):
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(cells[0], widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in cells[1:]:
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)))


def benchmark_parser(
    description: str, sizes: Sequence[int], repeats: int
) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``--child`` is how a row runs in its own process."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(sizes))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--force-bf16",
        action="store_true",
        help="measure bf16 even where this device has no native bf16 matmul",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def add_malloc_argument(parser: argparse.ArgumentParser):
    """``--malloc system retain``: glibc malloc as it comes, or as the training command sets it."""
    parser.add_argument(
        "--malloc",
        nargs="+",
        default=["system", "retain"],
        choices=["system", "retain"],
        help="glibc malloc as it comes, or gca_pyg.runtime.retain_freed_memory() "
        "as the training command sets it",
    )


def report_machine(device: torch.device) -> dict[str, float]:
    """Measures and prints the matmul peak per dtype; returns it in GFLOP/s.

    Native bf16 is timed like fp32 (AMX tiles at size 1024 reach only about two thirds of their
    peak); emulated bf16 is slow, so a smaller matmul does there.
    """
    native = native_bf16(device)
    if device.type == "cuda":  # a GPU reaches its peak only on products far larger than 2048
        peak = {
            name: matmul_gflops(device, dtype, size=8192, repeats=10)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
    else:
        peak = {
            "fp32": matmul_gflops(device, torch.float32),
            "bf16": matmul_gflops(
                device, torch.bfloat16, size=2048 if native else 1024, repeats=5 if native else 2
            ),
        }
    print(
        f"device {device}, {torch.get_num_threads()} threads; matmul peak measured here: "
        f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s"
        f"{'' if native else ' (no native bf16 matmul on this device)'}"
    )
    return peak
