"""Does a part of GCA-HNG help? Any recipe, any metric loss, two arms of settings over seeds.

Each run is ``python -m gca_pyg.train CONFIG`` in a fresh process, identical but for its arm's
settings, ``loss.metric`` and ``train.seed``. The two arms are by default synthesis on and off
(``loss.synthesis``; off: the same model and net, J_metric = J_m + J_gce, no generator update);
``--arms A [A2 ...] B`` compares any arms with the last one, each a comma-separated list of
``key=value`` settings (e.g. memory nodes, ``graph.memory=4096`` against ``graph.memory=0``, or
several ``loss.synthetic_proxies`` values against ``loss.synthesis=false``). For every metric loss
the tables give the final epoch's test metrics as mean ± sample standard deviation over seeds, the
paired per-seed differences A − B (mean ± standard deviation), and on how many seeds A came out
ahead. The final epoch, not the best: choosing an epoch by its test score would flatter both arms.
``--jobs J`` runs J trainings at once, each on ``--threads`` threads (default: one per job, so
that J runs share J cores without slowing each other down). ``--diagnostics`` trains with
``train.diagnostics`` (which changes no update, so finished runs are reused) and prints, per arm,
how J_syn met J_m at a few epochs: the loss ratio, the gradient-norm ratios on the embeddings and
the proxies, the cosines of synthetic negatives to class centres, hardness and synthetic weight
(means over seeds).

    python benchmarks/ablate.py demo --seeds 0 1 2 --metric npair proxy_anchor
    python benchmarks/ablate.py demo --metric pml:MultiSimilarityLoss --jobs 2  # any PML loss
    python benchmarks/ablate.py cub --data-root ~/data/CUB_200_2011 --seeds 0 1 2
    python benchmarks/ablate.py demo --seeds 0 --set optim.epochs=2          # a quick look
    python benchmarks/ablate.py demo --set graph.neighbors=16 \
        --arms graph.memory=4096 graph.memory=0                               # memory nodes
    python benchmarks/ablate.py demo --metric proxy_anchor --jobs 2 --arms \
        loss.synthetic_proxies=relative loss.synthetic_proxies=anchor loss.synthesis=false

Runs take long; ``--results FILE`` keeps every finished run there (JSON) and a later call with the
same file reuses them, so an interrupted ablation continues where it stopped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from gca_pyg.config import add_override_argument

METRIC_NAMES = {"map@r": "MAP@R", "r_precision": "RP"}


#: The default arms: synthesis on and off.
SYNTHESIS_ARMS = ("loss.synthesis=true", "loss.synthesis=false")
#: Their short names in tables and result keys.
ARM_NAMES = {"loss.synthesis=true": "on", "loss.synthesis=false": "off"}


def arm_name(arm: str) -> str:
    return ARM_NAMES.get(arm, arm)


def run_key(metric: str, arm: str, seed: int) -> str:
    return f"{metric}/{arm_name(arm)}/{seed}"


def settings_of(args, metric: str, arm: str, seed: int) -> list[str]:
    """The ``--set`` overrides of one run."""
    return [f"loss.metric={metric}", *arm.split(","), f"train.seed={seed}", *args.overrides]


def train(args, settings: list[str]) -> dict:
    """One training run (``--threads`` threads); its final epoch's test metrics and wall time."""
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "gca_pyg.train", args.config]
        if args.data_root:
            command += ["--data-root", args.data_root]
        diagnostics = ["train.diagnostics=true"] if args.diagnostics else []
        for setting in [*settings, *diagnostics, f"train.output_dir={output}"]:
            command += ["--set", setting]
        started = time.perf_counter()
        threads = str(args.threads)
        environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        if result.returncode != 0:
            sys.exit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        (run_dir,) = [path for path in Path(output).iterdir() if path.is_dir()]
        epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    last = epochs[-1]
    return {
        "seconds": time.perf_counter() - started,
        "epoch": last["epoch"],
        "settings": settings,
        "metrics": {key[5:]: value for key, value in last.items() if key.startswith("test/")},
        "epochs": [
            {k: v for k, v in epoch.items() if not k.startswith("test/")} for epoch in epochs
        ],
    }


#: The columns of the diagnostics table: (header, function of one epoch's log record).
DIAGNOSTICS = (
    ("J_m", lambda r: r["J_m"]),
    ("J_syn", lambda r: r["J_syn"]),
    ("w·J_syn / J_m", lambda r: r["synthetic_weight"] * r["J_syn"] / r["J_m"]),
    ("‖∇z‖ syn / m", lambda r: r["diag_grad_z_J_syn"] / r["diag_grad_z_J_m"]),
    ("‖∇P‖ syn / m", lambda r: r["diag_grad_proxies_J_syn"] / r["diag_grad_proxies_J_m"]),
    ("cos(a, p_a)", lambda r: r["diag_cos_anchor_proxy"]),
    ("cos(ñ, p_a)", lambda r: r["diag_cos_syn_anchor_proxy"]),
    ("cos(ñ, p_c)", lambda r: r["diag_cos_syn_own_proxy"]),
    ("cos(ñ, a)", lambda r: r["diag_cos_syn_anchor"]),
    ("h", lambda r: r["hardness"]),
    ("w", lambda r: r["synthetic_weight"]),
)


def diagnostics_table(runs: dict, metrics: list[str], seeds: list[int], arms) -> str:
    """Per metric loss, arm and a few epochs (the first, a quarter, half, the last): the
    diagnostics of ``train.diagnostics``, each a mean over seeds; "–" where a run did not log
    them (synthesis off, or a run trained without diagnostics)."""
    rows = []
    for metric in metrics:
        for arm in arms:
            logs = [runs[run_key(metric, arm, seed)].get("epochs", []) for seed in seeds]
            if not all(logs):
                continue
            last = min(len(log) for log in logs)
            for epoch in sorted({1, max(1, last // 4), max(1, last // 2), last}):
                row = [metric, arm_name(arm), str(epoch)]
                for _, value in DIAGNOSTICS:
                    try:
                        values = [value(log[epoch - 1]) for log in logs]
                    except (KeyError, ZeroDivisionError):
                        row.append("–")
                        continue
                    row.append(f"{statistics.mean(values):.3g}")
                rows.append(row)
    header = ["metric loss", "arm", "epoch"] + [name for name, _ in DIAGNOSTICS]
    return markdown(header, rows)


def label(name: str) -> str:
    return METRIC_NAMES.get(name, name.replace("recall@", "R@"))


def mean_sd(values: list[float], signed: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = 100 * statistics.mean(values)
    return f"{mean:+.2f} ± {100 * spread:.2f}" if signed else f"{mean:.2f} ± {100 * spread:.2f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tables(runs: dict, metrics: list[str], seeds: list[int], arms=SYNTHESIS_ARMS) -> str:
    """The summary table (every test metric) and the per-seed table (R@1, MAP@R) of each arm A
    against the last arm B; with more than two arms, a column names each row's arm A."""
    summary, per_seed = [], []
    several = len(arms) > 2
    baseline = arms[-1]
    for metric in metrics:
        off = [runs[run_key(metric, baseline, seed)]["metrics"] for seed in seeds]
        for arm in arms[:-1]:
            on = [runs[run_key(metric, arm, seed)]["metrics"] for seed in seeds]
            first = [metric, arm_name(arm)] if several else [metric]
            for name in on[0]:
                with_, without = [r[name] for r in on], [r[name] for r in off]
                differences = [a - b for a, b in zip(with_, without)]
                summary.append(
                    first
                    + [
                        label(name),
                        mean_sd(with_),
                        mean_sd(without),
                        mean_sd(differences, signed=True),
                        f"{sum(d > 0 for d in differences)}/{len(differences)}",
                    ]
                )
            for seed, a, b in zip(seeds, on, off):
                per_seed.append(
                    first
                    + [str(seed)]
                    + [
                        f"{100 * value:.2f}"
                        for name in ("recall@1", "map@r")
                        for value in (a[name], b[name], a[name] - b[name])
                    ]
                )
    a, b = arm_name(arms[0]), arm_name(baseline)
    first = ["metric loss", "arm A"] if several else ["metric loss"]
    if tuple(arms) == SYNTHESIS_ARMS:
        header = first + ["metric", "synthesis on", "synthesis off", "on − off", "on > off"]
    else:
        header = first + ["metric", "A" if several else f"A: {a}", f"B: {b}", "A − B", "A > B"]
        a, b = "A", "B"
    seed_header = first + ["seed", f"R@1 {a}", f"R@1 {b}", "Δ", f"MAP@R {a}"]
    seed_header += [f"MAP@R {b}", "Δ"]
    return markdown(header, summary) + "\n\n" + markdown(seed_header, per_seed)


def torch_threads() -> int:
    """The thread count a training would take by itself (torch's default: the cores)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def load_results(path: Optional[Path]) -> dict:
    if path is None or not path.exists():
        return {}
    return json.loads(path.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a shipped recipe or a YAML file")
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--metric",
        nargs="+",
        default=["npair"],
        help="metric losses to ablate (loss.metric): npair, proxy_anchor, pml:<LossName>",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(SYNTHESIS_ARMS),
        metavar="ARM",
        help="two or more arms, each comma-separated key=value settings; every arm is compared "
        "with the last (default: loss.synthesis=true loss.synthesis=false)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default: 1)")
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="train with train.diagnostics and print how J_syn met J_m per epoch",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per training (default: 1 with --jobs above 1, else torch's default)",
    )
    add_override_argument(parser, "override one config key of every run (repeatable)")
    parser.add_argument(
        "--results", type=Path, metavar="FILE", help="keep and reuse finished runs here (JSON)"
    )
    args = parser.parse_args(argv)
    if len(args.arms) < 2:
        parser.error("--arms needs at least two arms (each compared with the last)")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    if args.threads is None:
        args.threads = 1 if args.jobs > 1 else torch_threads()

    runs = load_results(args.results)
    todo = {}
    for metric in args.metric:
        for seed in args.seeds:
            for arm in args.arms:
                key, settings = run_key(metric, arm, seed), settings_of(args, metric, arm, seed)
                if not (key in runs and runs[key]["settings"] == settings):
                    todo[key] = settings
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(train, args, settings) for key, settings in todo.items()}
        for key, future in futures.items():
            runs[key] = future.result()
            if args.results is not None:  # in submission order, each as soon as it is known
                args.results.write_text(json.dumps(runs, indent=1))
            print(
                f"  {key}: R@1 {100 * runs[key]['metrics']['recall@1']:.2f} "
                f"in {runs[key]['seconds']:.0f} s",
                file=sys.stderr,
            )
    chosen = [
        runs[run_key(metric, arm, seed)]
        for metric in args.metric
        for seed in args.seeds
        for arm in args.arms
    ]
    seconds = statistics.mean(run["seconds"] for run in chosen)
    print(
        f"{args.config}{' ' + ' '.join(args.overrides) if args.overrides else ''}: final epoch "
        f"({chosen[0]['epoch']}), test metrics in %, mean ± sd over seeds "
        f"{' '.join(map(str, args.seeds))}; {' − '.join(map(arm_name, args.arms))} paired by seed; "
        f"{seconds:.0f} s per run\n"
    )
    print(tables(runs, args.metric, args.seeds, args.arms))
    if args.diagnostics:
        print("\n" + diagnostics_table(runs, args.metric, args.seeds, args.arms))


if __name__ == "__main__":
    main()
