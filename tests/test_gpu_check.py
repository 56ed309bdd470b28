"""benchmarks/gpu_check.py: its readers of the parts' output, and the whole plan as a dry run."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

STEP_OUTPUT = """\
device cuda, 16 threads; matmul peak measured here: fp32 51000 GFLOP/s, bf16 700000 GFLOP/s
  measured N=81 dense fp32 system
N    | C x K  | graph | edges | dtype | malloc | ms/step | peak MB
-----+--------+-------+-------+-------+--------+---------+--------
  81 |   27x3 | dense |  3321 |  fp32 | system |      50 |     683
4096 | 1024x4 |  k=32 | 82784 |  bf16 | system |     302 |    9700
4096 | 1024x4 |  k=32 | 82784 |  fp32 | system |     364 |   13162
skipped (would not fit in this machine's memory): N=8192 k=32 bf16 system (about 200 GiB)
"""

REFERENCE_OUTPUT = """\
N   | C x K | step      | dtype | malloc | ms/step | peak MB | GFLOP/step | ref fp32 / this
----+-------+-----------+-------+--------+---------+---------+------------+----------------
 81 |  27x3 | reference |  fp32 | system |      57 |    2095 |      503.7 |            1.0x
 81 |  27x3 |      ours |  bf16 | system |       6 |     614 |      174.6 |            9.5x
"""


def test_tables_are_read_row_by_row_up_to_the_first_line_that_is_not_a_row():
    (table,) = gpu_check.parse_tables(STEP_OUTPUT)
    assert [row["N"] for row in table] == ["81", "4096", "4096"]
    assert table[1] == {
        "N": "4096",
        "C x K": "1024x4",
        "graph": "k=32",
        "edges": "82784",
        "dtype": "bf16",
        "malloc": "system",
        "ms/step": "302",
        "peak MB": "9700",
    }
    (raw,) = gpu_check.raw_tables(STEP_OUTPUT)
    assert raw.splitlines()[0].startswith("N    | C x K") and raw.splitlines()[-1].endswith("13162")
    assert gpu_check.step_rows(STEP_OUTPUT) == (
        "N=81 fp32 50 ms, N=4096 k=32 bf16 302 ms, N=4096 k=32 fp32 364 ms"
    )


@pytest.mark.parametrize(
    "output, counts",
    [
        (
            "...F.\n1 failed, 4 passed, 315 deselected in 37.12s\n",
            "1 failed, 4 passed, 315 deselected",
        ),
        ("== 23 passed, 315 deselected in 46.0s ==\n", "23 passed, 315 deselected"),
        ("ImportError while loading conftest\n", ""),
    ],
)
def test_pytest_counts(output, counts):
    assert gpu_check.pytest_counts(output) == counts


def outcome(name, output):
    part = gpu_check.Part(name, [], 1, name)
    return gpu_check.Outcome(part, "ok", 1.0, "", output)


def test_goals_are_checked_against_the_measured_rows():
    met = gpu_check.goals(
        {
            "reference": outcome("reference", REFERENCE_OUTPUT),
            "sparse": outcome("sparse", STEP_OUTPUT),
        }
    )
    assert met == [
        "- N = 81, ours bf16 vs the authors' fp32 step: 9.5x (goal 8x: met)",
        "- the sparse N = 4096 step (fastest dtype): 302 ms (goal < 1000 ms: met)",
    ]
    slow = STEP_OUTPUT.replace("|     302 |", "|    1302 |").replace("|     364 |", "|    2364 |")
    missed = gpu_check.goals(
        {
            "reference": outcome("reference", REFERENCE_OUTPUT.replace("9.5x", "0.9x")),
            "sparse": outcome("sparse", slow),
        }
    )
    assert missed[0].endswith("0.9x (goal 8x: not met)")
    assert missed[1].endswith("1302 ms (goal < 1000 ms: not met)")
    assert gpu_check.goals({})[0].endswith("not measured")


ALL_PARTS = ["install", "machine", "tests", "train", "torchrun", "step", "sparse", "profile"]
ALL_PARTS += ["reference", "resnet50"]


def test_the_dry_run_plans_every_part_with_commands_that_exist(tmp_path):
    args = SimpleNamespace(
        dry_run=True,
        sizes=None,
        runs=str(tmp_path),
        wheels=str(tmp_path),
        no_install=False,
        reference=None,
    )
    parts = gpu_check.plan(args)
    assert [part.name for part in parts] == ALL_PARTS
    skipped = {part.name for part in parts if part.skip}
    assert skipped == {"install", "reference"}  # nothing to install, no checkout given
    for part in parts:
        scripts = [arg for arg in part.command if arg.endswith(".py")]
        assert all(Path(script).is_file() for script in scripts), part.name


def test_the_dry_run_runs_one_part_of_each_kind(tmp_path):
    """The machine report, a training command (its metrics read back), a benchmark table and the
    profile, tiny; the other parts run the same commands with other arguments (tests/test_train.py,
    test_torchrun.py and test_benchmarks.py run those), and their readers are tested above. The
    whole plan (``--dry-run`` alone) takes about three minutes here, too long for every CI run."""
    parts = ["machine", "train", "step", "profile"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--only", *parts]
        + ["--out", str(tmp_path), "--runs", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=2000,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[3].strip()
        for line in summary.splitlines()
        if line.startswith("| ") and not line.startswith("| part")
    }
    assert rows == dict.fromkeys(parts, "ok"), rows
    assert "## step" in summary  # the benchmark's table
    assert "R@1" in summary  # the training part reached its evaluation
    logs = (tmp_path / "logs.txt").read_text()
    assert logs.count("===== ") == len(parts)
