"""The step benchmark runs end to end at a toy size and prints what its docstring promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script, *args):
    """Runs benchmarks/`script` with `args`; its printed output."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def bench_step(*args):
    return run_benchmark("bench_step.py", *args)


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


def test_the_layer_benchmark_times_edge_node_conv_against_pyg_layers():
    out = run_benchmark(
        "bench_layers.py",
        *("--pyg", "--nodes", "200", "--edges", "1000", "--dim", "16", "--dtypes", "fp32"),
        *("--repeats", "1", "--threads", "1"),
    )
    cells = [[cell.strip() for cell in line.split("|")] for line in out.splitlines()]
    rows = [row for row in cells if len(row) == 8 and row[1] == "fp32"]
    names = [row[0] for row in rows]
    assert names[:2] == ["TransformerConv(edge_dim)", "GATv2Conv(edge_dim)"]
    assert {f"EdgeNodeConv({option})" for option in ("none", "key_value", "bias", "gate")} <= set(
        names
    )
    by_name = {row[0]: row for row in rows}
    assert by_name["TransformerConv(edge_dim)"][-1] == "1.00x"
    whole, half = by_name["EdgeNodeConv(none)"], by_name["EdgeNodeConv(none), node half"]
    assert float(half[6]) < float(whole[6])  # the node half does part of the work (GFLOP)
    assert int(by_name["EdgeNodeConv(key_value)"][2]) == int(whole[2]) + 16 * 16


def test_the_index_benchmark_prints_one_row_per_size_and_kind():
    out = run_benchmark(
        "bench_index.py", "--sizes", "3000", "--dim", "16", "--queries", "100", "--single", "20"
    )
    assert re.search(r"streaming the 0\.00 GB of vectors once takes [\d.]+ ms \([\d.]+ GB/s\)", out)
    assert "faiss IndexFlatIP.search itself: b1 p50" in out
    rows = [
        [cell.strip() for cell in line.split("|")]
        for line in out.split("load average at the end")[0].splitlines()
        if line.startswith("3,000 ")
    ]
    assert [row[1].split()[0] for row in rows[-5:]] == [
        "Flat", "IVF67,Flat", "HNSW32,Flat", "IVF67,SQ8", "IVF67,PQ2"
    ]  # fmt: skip
    queries = [float(row[-2]) for row in rows[-5:]]
    assert queries[0] == 1.0 and all(0.9 <= recall <= 1.0 for recall in queries[1:])
    calibrated = [row[-3] for row in rows[-5:]]
    assert calibrated[0] == "-" and all(re.fullmatch(r"0\.\d+ ± 0\.\d+", c) for c in calibrated[1:])
    shares = [int(row[4].rstrip("%")) for row in rows[-5:]]
    assert shares[0] == 100 and shares[3] < 50 and shares[4] < shares[3]  # SQ8, PQ: codes
    assert all(re.fullmatch(r"[\d.]+ -> [\d.]+", row[-1]) for row in rows[-5:])  # the load


def test_the_memory_benchmark_compares_each_memory_size_with_none():
    out = run_benchmark(
        "bench_memory.py",
        *("--sizes", "12", "--dim", "16", "--neighbors", "4", "--memory", "0", "64"),
        *("--repeats", "1"),
    )
    rows = [
        [cell.strip() for cell in line.split("|")]
        for line in out.splitlines()
        if line.startswith("12 ")
    ]
    assert [row[1] for row in rows] == ["0", "64"]
    assert rows[0][2] == "0" and 0 < int(rows[1][2]) <= 12 * 4  # memory nodes: k per batch node
    assert int(rows[1][3]) > int(rows[0][3]) and rows[0][5] == "1.00x"


def test_ablate_pairs_two_arms_of_settings_by_seed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ablate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    arms = ("graph.memory=4096", "graph.memory=0")
    args = type("Args", (), {"overrides": ["graph.neighbors=16"]})()
    assert ablate.settings_of(args, "npair", arms[0], 1) == [
        "loss.metric=npair",
        "graph.memory=4096",
        "train.seed=1",
        "graph.neighbors=16",
    ]
    runs = {
        ablate.run_key("npair", arm, seed): {"metrics": {"recall@1": r1, "map@r": r1 / 2}}
        for arm, values in zip(arms, ([0.70, 0.60], [0.65, 0.62]))
        for seed, r1 in enumerate(values)
    }
    summary, per_seed = ablate.tables(runs, ["npair"], [0, 1], arms).split("\n\n")
    assert "A: graph.memory=4096" in summary and "B: graph.memory=0" in summary
    r1 = next(line for line in summary.splitlines() if "| R@1 |" in line)
    # A − B per seed: +5 and −2 points: mean +1.50, sd 4.95; A ahead on 1 of 2 seeds.
    assert "+1.50 ± 4.95" in r1 and "1/2" in r1
    assert ablate.run_key("npair", "loss.synthesis=true", 0) == "npair/on/0"


def test_ablate_compares_several_arms_with_the_last():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ablate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    arms = (
        "loss.synthetic_proxies=relative",
        "loss.synthetic_proxies=anchor",
        "loss.synthesis=false",
    )
    values = {arms[0]: [0.80, 0.70], arms[1]: [0.60, 0.50], arms[2]: [0.65, 0.62]}
    log = [{"J_m": 2.0, "J_syn": 1.0, "synthetic_weight": 0.5, "hardness": 0.25}]
    runs = {
        ablate.run_key("proxy_anchor", arm, seed): {
            "metrics": {"recall@1": r1, "map@r": r1 / 2},
            "epochs": log if arm != arms[2] else [],
        }
        for arm, r1s in values.items()
        for seed, r1 in enumerate(r1s)
    }
    summary, per_seed = ablate.tables(runs, ["proxy_anchor"], [0, 1], arms).split("\n\n")
    r1_rows = [line for line in summary.splitlines() if "| R@1 |" in line]
    assert len(r1_rows) == 2  # one per arm against the baseline
    assert "relative" in r1_rows[0] and "+11.50 ± 4.95" in r1_rows[0] and "2/2" in r1_rows[0]
    assert "anchor" in r1_rows[1] and "-8.50 ± 4.95" in r1_rows[1] and "0/2" in r1_rows[1]
    assert (
        len([line for line in per_seed.splitlines() if "synthetic_proxies=relative |" in line]) == 2
    )
    table = ablate.diagnostics_table(runs, ["proxy_anchor"], [0, 1], arms)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [row[1].strip() for row in rows] == list(arms[:2])  # the baseline logged none
    assert rows[0][4].strip() == "1" and rows[0][5].strip() == "0.25"  # J_syn; w·J_syn / J_m
    assert rows[0][6].strip() == "–"  # gradient norms not logged


def test_the_real_image_sets_are_written_with_disjoint_classes(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = run_benchmark("real_images.py", "digits", str(tmp_path / "digits"))
    assert "901 training images of digits 0-4, 896 test images of digits 5-9" in out
    train = {p.name for p in (tmp_path / "digits" / "train").iterdir()}
    test = {p.name for p in (tmp_path / "digits" / "test").iterdir()}
    assert train == {"0", "1", "2", "3", "4"} and test == {"5", "6", "7", "8", "9"}
    out = run_benchmark("real_images.py", "glyphs", str(tmp_path / "glyphs"), "--classes", "6")
    train = {p.name for p in (tmp_path / "glyphs" / "train").iterdir()}
    test = {p.name for p in (tmp_path / "glyphs" / "test").iterdir()}
    assert len(train) == len(test) == 3 and not train & test
    images = sorted((tmp_path / "glyphs" / "train").glob("*/*.png"))
    assert len(images) == 3 * 32  # 16 faces, 2 renders each
    assert f"{len(list((tmp_path / 'glyphs').glob('*/*/*.png')))} images of 6 characters" in out
    from PIL import Image

    pixels = Image.open(images[0])
    assert pixels.size == (32, 32) and pixels.getextrema()[1] > 128  # a visible glyph
