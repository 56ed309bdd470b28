"""Prints the "Does synthesis help?" tables of docs/benchmarks.md from the ablation results kept
beside this file (``benchmarks/ablate.py --results`` files of 2026-12-07): every arm against the
same model without synthesis (off) and against the plain metric loss, paired by seed.

    python benchmarks/results/synthesis_table.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAIN = "loss.synthesis=false,loss.node_loss_to_embeddings=false"
DETACHED = "loss.node_loss_to_embeddings=false"
RELATIVE = "loss.synthetic_proxies=relative"
#: The demo's Proxy-Anchor runs with J_gce detached were kept in one file under the plain names.
DETACHED_RUNS = {"off": PLAIN, RELATIVE: f"{RELATIVE},{DETACHED}"}
SETS = {
    "demo": ["demo_all", "explore", "explore2", "demo_beta0", "gce", "pml_ms"],
    "digits": ["digits"],
    "glyphs": ["glyphs", "glyphs_others"],
    "glyphs, pretrained": ["glyphs_pre"],
}
ARMS = {
    "on": "on",
    RELATIVE: "**`relative`** (0.3.0)",
    "loss.synthetic_proxies=anchor": "`anchor` (0.2.0)",
    "loss.synthetic_proxies=others": "`others`",
    "loss.synthetic_proxies=class": "`class`",
    "loss.synthetic_proxies=proxy_positive": "`proxy_positive`",
    f"{RELATIVE},loss.hardness_scale=relative,loss.alpha=2.5": (
        "`relative`, `hardness_scale: relative`, α 2.5"
    ),
    f"{RELATIVE},loss.hardness_scale=relative,loss.alpha=1": (
        "`relative`, `hardness_scale: relative`, α 1"
    ),
    f"{RELATIVE},{DETACHED}": "`relative`, J_gce detached",
    DETACHED: "on, J_gce detached",
    "loss.beta=0": "control: `beta=0` (J_syn weight 0)",
    "loss.hardness_scale=relative,loss.alpha=2.5": "on, `hardness_scale: relative`, α 2.5",
}


#: The metric losses of the tables, by ``loss.metric``.
METRICS = (
    ("npair", "N-pair"),
    ("proxy_anchor", "Proxy-Anchor"),
    ("pml:MultiSimilarityLoss", "`pml:MultiSimilarityLoss`"),
)


def load(name: str) -> dict:
    runs = json.loads((HERE / f"synthesis-2026-12-07-{name}.json").read_text())
    if name != "gce":
        return runs
    renamed = {}
    for key, run in runs.items():
        metric, arm, seed = key.split("/")
        if metric == "proxy_anchor" and arm in DETACHED_RUNS:
            renamed[f"{metric}/{DETACHED_RUNS[arm]}/{seed}"] = run
    return renamed


def paired(runs: dict, metric: str, arm: str, base: str, name: str):
    """(mean ± sd of arm − base in points, how many seeds ahead, seeds), or None."""
    seeds = [
        s for s in range(3) if f"{metric}/{arm}/{s}" in runs and f"{metric}/{base}/{s}" in runs
    ]
    if not seeds:
        return None
    differences = [
        100
        * (
            runs[f"{metric}/{arm}/{s}"]["metrics"][name]
            - runs[f"{metric}/{base}/{s}"]["metrics"][name]
        )
        for s in seeds
    ]
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    text = f"{statistics.mean(differences):+.2f} ± {spread:.2f}".replace("-", "−")
    return text, f"{sum(d > 0 for d in differences)}/{len(differences)}", len(seeds)


def main():
    header = ["data set", "loss", "synthesis", "R@1 − off", "> off", "MAP@R − off", "> off"]
    rows = ["| " + " | ".join(header + ["R@1 − plain", "MAP@R − plain"]) + " |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    baselines = ["| data set | loss | off: R@1 | off: MAP@R | plain: R@1 | plain: MAP@R |"]
    baselines.append("|---|---|---|---|---|---|")
    for data_set, files in SETS.items():
        runs = {key: run for name in files for key, run in load(name).items()}
        for metric, loss in METRICS:
            if not any(key.startswith(f"{metric}/") for key in runs):
                continue
            for arm, label in ARMS.items():
                r1, r1_plain = (paired(runs, metric, arm, b, "recall@1") for b in ("off", PLAIN))
                if r1 is None and r1_plain is None:
                    continue
                mapr, mapr_plain = (paired(runs, metric, arm, b, "map@r") for b in ("off", PLAIN))
                seeds = (r1 or r1_plain)[2]
                cells = [data_set, loss, label + ("" if seeds == 3 else f" ({seeds} seeds)")]
                cells += [r1[0], r1[1], mapr[0], mapr[1]] if r1 else [""] * 4
                cells += (
                    [f"{r1_plain[0]} ({r1_plain[1]})", f"{mapr_plain[0]} ({mapr_plain[1]})"]
                    if r1_plain
                    else [""] * 2
                )
                rows.append("| " + " | ".join(cells) + " |")
            cells = [data_set, loss]
            for base in ("off", PLAIN):
                metrics = [
                    runs[f"{metric}/{base}/{s}"]["metrics"]
                    for s in range(3)
                    if f"{metric}/{base}/{s}" in runs
                ]
                for name in ("recall@1", "map@r"):
                    values = [100 * m[name] for m in metrics]
                    cells.append(
                        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
                        if len(values) == 3
                        else ""
                    )
            baselines.append("| " + " | ".join(cells) + " |")
    print("\n".join(rows) + "\n\n" + "\n".join(baselines))


if __name__ == "__main__":
    main()
