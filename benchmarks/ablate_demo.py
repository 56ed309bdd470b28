"""Does hard-negative synthesis help? The demo trained with and without it, over several seeds.

Each run is ``python -m gca_pyg.train demo`` in a fresh process, identical but for
``loss.synthesis`` (off: same model and net, J_metric = J_m + J_gce, no generator update) and
``train.seed``. The table gives mean ± standard deviation over seeds of the final epoch's metrics on
the unseen test classes (the final epoch, not the best: choosing an epoch by its test score would
flatter both arms).

    python benchmarks/ablate_demo.py                 # 3 seeds × 2 arms, about 25 minutes on 2 cores
    python benchmarks/ablate_demo.py --seeds 0 --set optim.epochs=2    # a quick look
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table

METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"]


def train(synthesis: bool, seed: int, output: Path, overrides) -> dict:
    command = [
        sys.executable,
        "-m",
        "gca_pyg.train",
        "demo",
        "--set",
        f"loss.synthesis={str(synthesis).lower()}",
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.output_dir={output}",
    ]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    return {
        "seconds": time.perf_counter() - started,
        **{name: last[f"test/{name}"] for name in METRICS},
    }


def mean_std(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="applied to both arms",
    )
    args = parser.parse_args()

    results = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for synthesis in (True, False):
                output = Path(scratch) / f"{synthesis}-{seed}"
                output.mkdir()
                run = train(synthesis, seed, output, args.overrides)
                results[synthesis].append(run)
                print(
                    f"  seed {seed}, synthesis {'on ' if synthesis else 'off'}: "
                    f"R@1 {100 * run['recall@1']:.2f} in {run['seconds']:.0f} s",
                    file=sys.stderr,
                )

    rows = []
    for name in METRICS:
        on = [run[name] for run in results[True]]
        off = [run[name] for run in results[False]]
        differences = [a - b for a, b in zip(on, off)]
        rows.append(
            [
                name.replace("recall@", "R@")
                .replace("map@r", "MAP@R")
                .replace("r_precision", "RP"),
                mean_std(on),
                mean_std(off),
                f"{100 * statistics.mean(differences):+.2f}",
                f"{sum(d > 0 for d in differences)}/{len(differences)}",
            ]
        )
    seconds = [run["seconds"] for arm in results.values() for run in arm]
    print(
        f"demo, final epoch, {len(args.seeds)} seed(s) per arm, % (mean ± std); "
        f"{statistics.mean(seconds):.0f} s per run"
    )
    print_table(["metric", "synthesis on", "synthesis off", "on − off", "seeds on > off"], rows)


if __name__ == "__main__":
    main()
