"""The step benchmark runs end to end at a toy size and prints what its docstring promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_step(*args):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_table_reports_time_inside_matmuls():
    out = bench_step("--sizes", "12", "--dim", "32", "--dtypes", "fp32", "--malloc", "retain")
    header, _, row = out.splitlines()[-3:]
    assert "in matmuls ms" in header and "matmuls of peak" in header
    cells = [cell.strip() for cell in row.split("|")]
    step_ms, matmul = float(cells[6]), float(cells[-2])
    assert 0 < matmul < step_ms  # the matmuls are part of the step, not all of it


def test_the_profile_splits_the_step_into_phases_and_operators():
    out = bench_step("--sizes", "12", "--dim", "32", "--dtypes", "fp32", "--profile")
    phases = {
        line.split("|")[0].strip()
        for line in out.splitlines()
        if "|" in line and not line.startswith("-")
    }
    assert {"backward", "net forward", "synthesis", "optimizer", "clipping", "losses"} <= phases
    totals = re.search(
        r"operators: (\d+) calls, (\d+) ms inside them, (\d+) ms of it in matmuls", out
    )
    assert totals, out[-2000:]
    calls, inside_ms, matmul_ms = (int(value) for value in totals.groups())
    # The slowest operators, one row each: (name, first input, calls, ms).
    rows = [
        [cell.strip() for cell in line.split("|")]
        for line in out.split("operators:", 1)[1].splitlines()
        if line.count("|") == 3 and not line.startswith(("operator", "-"))
    ]
    assert rows and sum(int(row[2]) for row in rows) <= calls
    matmul_rows = [row for row in rows if row[0] in {"mm", "addmm", "bmm", "baddbmm", "addmv"}]
    assert matmul_rows, rows  # a training step multiplies matrices; they are timed by name
    assert 0 <= matmul_ms <= inside_ms
    assert sum(float(row[3]) for row in matmul_rows) <= matmul_ms + 1  # rows are rounded


def test_the_index_benchmark_prints_one_row_per_size_and_kind():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_index.py"),
            "--sizes",
            "3000",
            "--dim",
            "16",
            "--queries",
            "100",
            "--single",
            "20",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("3,000 ")]
    assert [row[1].split()[0] for row in rows[-3:]] == ["exact", "IVF", "HNSW"]
    recalls = [float(row[-1]) for row in rows[-3:]]
    assert recalls[0] == 1.0 and all(0.9 <= recall <= 1.0 for recall in recalls[1:])
