"""Does hard-negative synthesis help? Any recipe, any metric loss, with and without synthesis.

Each run is ``python -m gca_pyg.train CONFIG`` in a fresh process, identical but for
``loss.synthesis`` (off: the same model and net, J_metric = J_m + J_gce, no generator update),
``loss.metric`` and ``train.seed``. For every metric loss the tables give the final epoch's test
metrics as mean ± sample standard deviation over seeds, the paired per-seed differences
on − off (mean ± standard deviation), and on how many seeds synthesis came out ahead. The final
epoch, not the best: choosing an epoch by its test score would flatter both arms.

    python benchmarks/ablate.py demo --seeds 0 1 2 --metric npair proxy_anchor
    python benchmarks/ablate.py cub --data-root ~/data/CUB_200_2011 --seeds 0 1 2
    python benchmarks/ablate.py demo --seeds 0 --set optim.epochs=2          # a quick look

Runs take long; ``--results FILE`` keeps every finished run there (JSON) and a later call with the
same file reuses them, so an interrupted ablation continues where it stopped.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from gca_pyg.config import add_override_argument
from gca_pyg.losses import METRIC_LOSSES

METRIC_NAMES = {"map@r": "MAP@R", "r_precision": "RP"}


def run_key(metric: str, synthesis: bool, seed: int) -> str:
    return f"{metric}/{'on' if synthesis else 'off'}/{seed}"


def settings_of(args, metric: str, synthesis: bool, seed: int) -> list[str]:
    """The ``--set`` overrides of one run."""
    return [
        f"loss.metric={metric}",
        f"loss.synthesis={str(synthesis).lower()}",
        f"train.seed={seed}",
        *args.overrides,
    ]


def train(args, settings: list[str]) -> dict:
    """One training run; its final epoch's test metrics and its wall time."""
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "gca_pyg.train", args.config]
        if args.data_root:
            command += ["--data-root", args.data_root]
        for setting in [*settings, f"train.output_dir={output}"]:
            command += ["--set", setting]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        (run_dir,) = [path for path in Path(output).iterdir() if path.is_dir()]
        last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    return {
        "seconds": time.perf_counter() - started,
        "epoch": last["epoch"],
        "settings": settings,
        "metrics": {key[5:]: value for key, value in last.items() if key.startswith("test/")},
    }


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


def tables(runs: dict, metrics: list[str], seeds: list[int]) -> str:
    """The summary table (every test metric) and the per-seed table (R@1, MAP@R)."""
    summary, per_seed = [], []
    for metric in metrics:
        on = [runs[run_key(metric, True, seed)]["metrics"] for seed in seeds]
        off = [runs[run_key(metric, False, seed)]["metrics"] for seed in seeds]
        for name in on[0]:
            with_, without = [r[name] for r in on], [r[name] for r in off]
            differences = [a - b for a, b in zip(with_, without)]
            summary.append(
                [
                    metric,
                    label(name),
                    mean_sd(with_),
                    mean_sd(without),
                    mean_sd(differences, signed=True),
                    f"{sum(d > 0 for d in differences)}/{len(differences)}",
                ]
            )
        for seed, a, b in zip(seeds, on, off):
            per_seed.append(
                [metric, str(seed)]
                + [
                    f"{100 * value:.2f}"
                    for name in ("recall@1", "map@r")
                    for value in (a[name], b[name], a[name] - b[name])
                ]
            )
    header = ["metric loss", "metric", "synthesis on", "synthesis off", "on − off", "on > off"]
    seed_header = ["metric loss", "seed", "R@1 on", "R@1 off", "Δ", "MAP@R on", "MAP@R off", "Δ"]
    return markdown(header, summary) + "\n\n" + markdown(seed_header, per_seed)


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
        choices=METRIC_LOSSES,
        help="metric losses to ablate (loss.metric)",
    )
    add_override_argument(parser, "override one config key of every run (repeatable)")
    parser.add_argument(
        "--results", type=Path, metavar="FILE", help="keep and reuse finished runs here (JSON)"
    )
    args = parser.parse_args(argv)

    runs = load_results(args.results)
    for metric in args.metric:
        for seed in args.seeds:
            for synthesis in (True, False):
                key, settings = (
                    run_key(metric, synthesis, seed),
                    settings_of(args, metric, synthesis, seed),
                )
                if key in runs and runs[key]["settings"] == settings:
                    continue
                runs[key] = train(args, settings)
                if args.results is not None:
                    args.results.write_text(json.dumps(runs, indent=1))
                print(
                    f"  {key}: R@1 {100 * runs[key]['metrics']['recall@1']:.2f} "
                    f"in {runs[key]['seconds']:.0f} s",
                    file=sys.stderr,
                )
    chosen = [
        runs[run_key(metric, synthesis, seed)]
        for metric in args.metric
        for seed in args.seeds
        for synthesis in (True, False)
    ]
    seconds = statistics.mean(run["seconds"] for run in chosen)
    print(
        f"{args.config}{' ' + ' '.join(args.overrides) if args.overrides else ''}: final epoch "
        f"({chosen[0]['epoch']}), test metrics in %, mean ± sd over seeds "
        f"{' '.join(map(str, args.seeds))}; on − off paired by seed; {seconds:.0f} s per run\n"
    )
    print(tables(runs, args.metric, args.seeds))


if __name__ == "__main__":
    main()
