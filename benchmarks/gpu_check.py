"""Checks and times the CUDA path in one command: tests, step benchmarks, training, torchrun.

Made for a GPU machine borrowed for a few minutes, with no internet and nothing to install from:
it installs gca_pyg into that machine's Python without dependencies (``pip install --no-deps -e
.``) and the wheels it lacks from a folder carried along (``benchmarks/gpu_wheels.sh`` fills
``.whl/`` here), then runs each part in its own process under a time limit of its own, inside one
total budget, so that a part that hangs or fails costs its own minutes only:

==========  ================================================================================
install     the carried wheels (faiss-cpu, pytorch-metric-learning) and gca_pyg, checked
machine     GPU, driver, torch / CUDA / PyG versions, what imports
tests       ``pytest -m cuda``: the layer, trainer, bf16, k-NN and metrics tests on CUDA
step        ``bench_step.py``: fp32 and bf16, the complete graph at N = 81, 162, 324, 648
sparse      ``bench_step.py``: the sparse graph, k = 32, at N = 1024 and 4096
reference   ``bench_reference.py``: the authors' step beside ours at N = 81 and 162
resnet50    ``bench_step.py --backbone resnet50``: N = 81, 224 px, fp32/bf16 x memory formats
train       ``python -m gca_pyg.train demo`` for 2 epochs
torchrun    ``torchrun --nproc-per-node 1`` with NCCL for 1 epoch
==========  ================================================================================

Everything lands in one folder (``$OUT`` when set, else ``--out``): ``summary.md``, one Markdown
table of the parts followed by the tables the benchmarks printed and the goals checked, rewritten
after every part so a run cut short still leaves what it measured; ``logs.txt``, every part's
whole output. ``--dry-run`` runs the same plan on whatever device is here with tiny sizes and
without installing anything, in a few minutes on a CPU: it is how the script is kept working
between GPU loans (tests/test_gpu_check.py runs it).

    bash benchmarks/gpu_wheels.sh                       # here, once: fills .whl/
    python benchmarks/gpu_check.py --reference /tmp/GCA-HNG   # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

import argparse
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: Where the carried wheels are installed (not into the machine's own site-packages, which may be
#: read-only or shared).
WHEEL_SITE = Path("/tmp/gca_pyg_wheels")

#: N = 81 in bf16 against the authors' fp32 step on the same GPU.
GOAL_SPEEDUP = 8.0
#: The sparse N = 4096 step.
GOAL_SPARSE_MS = 1000.0


@dataclass
class Part:
    name: str
    command: list[str]
    timeout: float
    what: str
    summarize: Callable[[str], str] = lambda output: ""
    table: bool = False  # the part prints a benchmark table worth copying into the summary
    skip: Optional[str] = None  # why it does not run


@dataclass
class Outcome:
    part: Part
    status: str
    seconds: float
    result: str
    output: str = ""
    tables: list[str] = field(default_factory=list)


# -- reading the parts' output ---------------------------------------------------------------------
def parse_tables(output: str) -> list[list[dict[str, str]]]:
    """The tables ``common.print_table`` printed: a header line, a ``-+-`` rule, rows."""
    lines = output.splitlines()
    tables = []
    for index, line in enumerate(lines):
        if index == 0 or not re.fullmatch(r"-+(-\+-+)+", line.strip()):
            continue
        header = [cell.strip() for cell in lines[index - 1].split("|")]
        rows = []
        for row in lines[index + 1 :]:
            cells = [cell.strip() for cell in row.split("|")]
            if len(cells) != len(header):
                break
            rows.append(dict(zip(header, cells)))
        tables.append(rows)
    return tables


def raw_tables(output: str) -> list[str]:
    """The text of every printed table, header to last row, to copy as it is."""
    lines, blocks = output.splitlines(), []
    for index, line in enumerate(lines):
        if index == 0 or not re.fullmatch(r"-+(-\+-+)+", line.strip()):
            continue
        width = lines[index - 1].count("|")
        end = index + 1
        while end < len(lines) and lines[end].count("|") == width:
            end += 1
        blocks.append("\n".join(lines[index - 1 : end]))
    return blocks


def pytest_counts(output: str) -> str:
    """The final counts of a pytest run (``12 passed, 1 failed, ...``)."""
    found = re.findall(r"=+ (.*(?:passed|failed|error|skipped|deselected).*?) in [\d.]+s", output)
    if found:
        return found[-1]
    quiet = re.findall(
        r"^(\d+ (?:passed|failed|error|skipped|deselected).*?) in [\d.]+s", output, re.M
    )
    return quiet[-1] if quiet else ""


def step_rows(output: str) -> str:
    """``N=81 fp32 12 ms`` for every measured row of a bench_step table."""
    cells = []
    for table in parse_tables(output):
        for row in table:
            if "ms/step" in row and row["ms/step"]:
                graph = "" if row.get("graph", "dense") == "dense" else f" {row['graph']}"
                cells.append(f"N={row['N']}{graph} {row['dtype']} {row['ms/step']} ms")
    return ", ".join(cells)


def backbone_rows(output: str) -> str:
    fastest = re.search(r"^fastest: (.*)$", output, re.M)
    return fastest.group(1) if fastest else step_rows(output)


def reference_rows(output: str) -> str:
    cells = []
    for table in parse_tables(output):
        for row in table:
            if row.get("ms/step"):
                ratio = f" ({row['ref fp32 / this']})" if row.get("ref fp32 / this") else ""
                cells.append(
                    f"N={row['N']} {row['step']} {row['dtype']} {row['ms/step']} ms{ratio}"
                )
    skipped = re.search(r"^skipped: (.*)$", output, re.M)
    return ", ".join(cells) or (skipped.group(0) if skipped else "")


def training_result(output: str) -> str:
    """The retrieval metrics a training run printed last (its first column), and on what."""
    tables = [t for t in parse_tables(output) if t and "metric" in t[0]]
    if not tables:
        return ""
    column = next(name for name in tables[-1][0] if name != "metric")
    metrics = ", ".join(f"{row['metric']} {row[column]}" for row in tables[-1])
    device = re.search(r"training \S+ on (\S+)", output)
    return f"{metrics} ({column}{', ' + device.group(1) if device else ''})"


def profile_result(output: str) -> str:
    found = re.search(r"^one step: (.*)$", output, re.M)
    return found.group(1) if found else ""


def machine_result(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("device:", "torch:"))]
    return "; ".join(line.split(": ", 1)[1] for line in lines)


# -- the plan ----------------------------------------------------------------------------------
MACHINE_REPORT = """
import importlib, os, platform, torch
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}, Python {platform.python_version()}")
for name in ("torch_geometric", "faiss", "timm", "pytorch_metric_learning", "onnxruntime",
             "torch_scatter", "gca_pyg"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')} ({os.path.dirname(module.__file__)})")
    except Exception as error:  # report, do not stop: the parts that need it will say more
        print(f"{name}: not importable ({type(error).__name__}: {error})")
"""


def plan(args) -> list[Part]:
    python = sys.executable
    dry = args.dry_run
    bench = lambda name: [python, str(BENCHMARKS / name)]  # noqa: E731
    if dry:  # the same parts, tiny
        step = ["--sizes", *(args.sizes or ["12"]), "--dim", "32", "--repeats", "1"]
        sparse = ["--per-class", "4", "--sizes", "64", "--neighbors", "8", "--dim", "32"]
        sparse += ["--repeats", "1"]
        reference = ["--sizes", "12", "--repeats", "1"]
        backbone = ["--backbone", "small_cnn", "--sizes", "12", "--dim", "32", "--repeats", "1"]
        profile = ["--sizes", "12", "--dim", "32", "--dtypes", "fp32"]
        # 10 steps of 50 classes x 6 images and a small net: seconds per epoch on a CPU.
        demo = [
            "optim.epochs=1",
            "data.classes_per_batch=50",
            "data.samples_per_class=6",
            "model.embedding_size=32",
            "net.num_layers=1",
            "net.heads=2",
            "eval.batch_size=500",
        ]
        backend = "auto"
    else:
        step = ["--sizes", *(args.sizes or ["81", "162", "324", "648"]), "--repeats", "5"]
        sparse = ["--per-class", "4", "--sizes", "1024", "4096", "--neighbors", "32"]
        sparse += ["--repeats", "3"]
        reference = ["--sizes", "81", "162", "--repeats", "5"]
        backbone = ["--backbone", "resnet50", "--sizes", "81", "--repeats", "3"]
        profile = ["--sizes", "81", "--dtypes", "bf16"]
        demo = ["optim.epochs=2", "train.eval_every=1"]
        backend = "nccl"
    demo = [arg for setting in demo for arg in ("--set", setting)]
    runs = ["--set", f"train.output_dir={args.runs}"]
    dtypes = ["--dtypes", "fp32", "bf16", "--malloc", "system"]
    wheels = sorted(glob.glob(str(Path(args.wheels) / "*.whl")))
    install_skip = None
    if dry:
        install_skip = "dry run: nothing is installed"
    elif args.no_install:
        install_skip = "--no-install"
    install = (
        "set -e; "
        + (
            f"{shlex.quote(python)} -m pip install -q --no-index --no-deps --no-compile "
            f"--upgrade --target {WHEEL_SITE} {' '.join(shlex.quote(w) for w in wheels)}; "
            if wheels
            else "echo 'no wheels carried in " + shlex.quote(str(args.wheels)) + "'; "
        )
        + f"{shlex.quote(python)} -m pip install -q --no-deps --no-build-isolation -e "
        f"{shlex.quote(str(ROOT))} || echo 'editable install failed; PYTHONPATH carries "
        "the checkout'; "
        f'cd /tmp && {shlex.quote(python)} -c \'import gca_pyg, faiss; print("gca_pyg", '
        'gca_pyg.__file__, "faiss", faiss.__version__)\''
    )
    reference_skip = None
    if not args.reference:
        reference_skip = "no --reference DIR (a checkout of PWenJay/GCA-HNG)"
    return [
        Part(
            "install",
            ["bash", "-c", install],
            120,
            "carried wheels and gca_pyg into this Python",
            summarize=lambda out: " ".join(out.strip().splitlines()[-1:]),
            skip=install_skip,
        ),
        Part(
            "machine",
            [python, "-c", MACHINE_REPORT],
            60,
            "GPU, versions, imports",
            summarize=machine_result,
        ),
        Part(
            "tests",
            [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfE"],
            150,
            "pytest -m cuda: layers, trainer, bf16, k-NN, metrics on CUDA",
            summarize=pytest_counts,
        ),
        Part(
            "train",
            [python, "-m", "gca_pyg.train", "demo"] + demo + runs,
            150,
            "python -m gca_pyg.train demo",
            summarize=training_result,
        ),
        Part(
            "torchrun",
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "1",
                "-m",
                "gca_pyg.train",
                "demo",
            ]
            + demo
            + ["--set", "optim.epochs=1", "--set", f"train.dist_backend={backend}"]
            + runs,
            120,
            f"torchrun --nproc-per-node 1, {backend}, 1 epoch",
            summarize=training_result,
        ),
        Part(
            "step",
            bench("bench_step.py") + step + dtypes,
            150,
            "one training step, complete graph, fp32/bf16",
            summarize=step_rows,
            table=True,
        ),
        Part(
            "sparse",
            bench("bench_step.py") + sparse + dtypes,
            120,
            "one training step, sparse graph k = 32",
            summarize=step_rows,
            table=True,
        ),
        Part(
            "profile",
            bench("bench_step.py") + profile + ["--profile"],
            90,
            "where one bf16 step's time goes (torch.profiler)",
            summarize=profile_result,
        ),
        Part(
            "reference",
            bench("bench_reference.py")
            + ["--reference", str(args.reference or ""), "--malloc", "system"]
            + reference,
            120,
            "the authors' step beside ours",
            summarize=reference_rows,
            table=True,
            skip=reference_skip,
        ),
        Part(
            "resnet50",
            bench("bench_step.py") + backbone + ["--dtypes", "fp32", "bf16"],
            120,
            "the step with a backbone: dtype x memory format",
            summarize=backbone_rows,
            table=True,
        ),
    ]


# -- running -------------------------------------------------------------------------------------
def child_environment(args) -> dict[str, str]:
    paths = [str(ROOT), str(BENCHMARKS)]
    if not args.dry_run:
        paths.insert(0, str(WHEEL_SITE))
    paths.append(os.environ.get("PYTHONPATH", ""))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, paths)),
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }


def run_part(part: Part, timeout: float, env: dict[str, str]) -> Outcome:
    if part.skip:
        return Outcome(part, "skipped", 0.0, part.skip)
    if timeout < 5:
        return Outcome(part, "skipped", 0.0, "the total budget is spent")
    start = time.perf_counter()
    # A session of its own, so that a timeout ends the part's children too (torchrun's workers,
    # the benchmarks' measuring processes).
    process = subprocess.Popen(
        part.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = f"timed out ({timeout:.0f} s)"
    seconds = time.perf_counter() - start
    if part.name == "tests" and process.returncode == 5:
        status = "ok"  # pytest: nothing selected, i.e. no CUDA here
    try:
        result = part.summarize(output)
    except Exception as error:  # a summary that cannot be read must not lose the log
        result = f"(unreadable output: {error})"
    if not status.startswith("ok") and not result:
        tail = [line for line in output.strip().splitlines() if line.strip()]
        result = tail[-1][:200] if tail else ""
    return Outcome(part, status, seconds, result, output, raw_tables(output) if part.table else [])


def goals(outcomes: dict[str, Outcome]) -> list[str]:
    """The two goals of the CUDA path, checked against what was measured."""

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    speedup = best = None
    reference, sparse = outcomes.get("reference"), outcomes.get("sparse")
    for table in parse_tables(reference.output if reference else ""):
        for row in table:
            if (row.get("N"), row.get("step"), row.get("dtype")) == ("81", "ours", "bf16"):
                ratio = row.get("ref fp32 / this", "").rstrip("x")
                speedup = float(ratio) if ratio else None
    for table in parse_tables(sparse.output if sparse else ""):
        for row in table:
            if row.get("N") == "4096" and row.get("ms/step", "").isdigit():
                ms = float(row["ms/step"])
                best = ms if best is None else min(best, ms)
    first = "- N = 81, ours bf16 vs the authors' fp32 step: "
    if speedup is None:
        first += "not measured"
    else:
        first += f"{speedup:.1f}x (goal {GOAL_SPEEDUP:.0f}x: {verdict(speedup >= GOAL_SPEEDUP)})"
    second = "- the sparse N = 4096 step (fastest dtype): "
    if best is None:
        second += "not measured"
    else:
        second += (
            f"{best:.0f} ms (goal < {GOAL_SPARSE_MS:.0f} ms: {verdict(best < GOAL_SPARSE_MS)})"
        )
    return [first, second]


def write_summary(out: Path, outcomes: list[Outcome], args, started: str, total: float):
    lines = [
        f"# gpu_check{' --dry-run' if args.dry_run else ''}, {started}",
        "",
        f"{total:.0f} s of a {args.budget:.0f} s budget.",
        "",
        "| part | what | status | s | result |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        cell = o.result.replace("|", "\\|")
        lines.append(f"| {o.part.name} | {o.part.what} | {o.status} | {o.seconds:.0f} | {cell} |")
    by_name = {o.part.name: o for o in outcomes}
    lines += ["", "## Goals", ""] + goals(by_name)
    for o in outcomes:
        if o.tables:
            lines += ["", f"## {o.part.name}", "", "```"] + ["\n\n".join(o.tables), "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "logs.txt", "w") as logs:
        for o in outcomes:
            logs.write(f"===== {o.part.name}: {o.status}, {o.seconds:.0f} s =====\n")
            logs.write(f"$ {shlex.join(o.part.command)}\n{o.output}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, no install")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for all the parts (default 480; 1800 for a dry run, whose parts may run on "
        "a slow or busy CPU and get 4x their time limits)",
    )
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels")
    parser.add_argument("--no-install", action="store_true", help="use the Python as it is")
    parser.add_argument("--reference", help="a checkout of PWenJay/GCA-HNG (the authors' code)")
    parser.add_argument("--only", nargs="+", help="run only these parts")
    parser.add_argument("--sizes", nargs="+", help="N of the complete-graph step rows")
    parser.add_argument("--runs", default="/tmp/gca_pyg_gpu_runs", help="training runs' folder")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 480.0
    slack = 4 if args.dry_run else 1
    if args.reference and not Path(args.reference, "scripts", "models.py").is_file():
        parser.error(f"--reference {args.reference} is not a checkout of PWenJay/GCA-HNG")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan(args)
    if args.only:
        unknown = set(args.only) - {p.name for p in parts}
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; parts: {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in args.only]
    env = child_environment(args)
    started, begin, outcomes = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter(), []
    for part in parts:
        limit = min(slack * part.timeout, args.budget - (time.perf_counter() - begin))
        print(f"-- {part.name}: {part.what} (up to {limit:.0f} s)", flush=True)
        outcome = run_part(part, limit, env)
        outcomes.append(outcome)
        print(f"   {outcome.status}, {outcome.seconds:.0f} s: {outcome.result}", flush=True)
        write_summary(out, outcomes, args, started, time.perf_counter() - begin)
    print((out / "summary.md").read_text())
    failed = [o.part.name for o in outcomes if not o.status.startswith(("ok", "skipped"))]
    if failed:
        print(f"failed: {', '.join(failed)} (logs: {out / 'logs.txt'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
