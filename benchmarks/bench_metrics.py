"""Time and peak memory of ``retrieval_metrics`` at the test-set sizes of CUB, Cars and SOP.

Each size runs in a fresh subprocess on synthetic clustered 512-d embeddings with the data set's
number of classes and range of class sizes, and the ks it is reported with (1, 2, 4, 8 for CUB
and Cars; 1, 10, 100, 1000 for SOP).

* Time: the best wall time of ``--repeats`` calls, and the CPU time (user + system, all threads)
  of that call: on a machine shared with other work the wall time grows, the CPU time much less.
  ``--threads`` sets the ``num_threads`` of each row (the matrix products always use torch's
  threads). The 1-minute load average before and after the run is printed under the table.
* Memory: how far the first call raises the process's peak resident set size (``ru_maxrss`` from
  ``resource.getrusage``, Linux), which sees faiss, BLAS and numpy allocations alike; the embeddings
  are loaded and a small warm-up call made before the baseline is read.
* Floor: the time of the N²·D multiply-adds (2·N²·D flops) of all query × gallery scores at the
  sgemm rate that ``torch.mm`` reaches on one 4096 × 4096 × 512 tile, measured in the same
  subprocess right after the calls. With the gallery as its own query set the score matrix is
  symmetric and ``retrieval_metrics`` computes one triangle, so half that floor is its own floor.
* ``--pml`` also times pytorch-metric-learning's ``AccuracyCalculator`` (Recall@1, MAP@R and RP
  with ``k="max_bin_count"`` and its exact faiss k-NN) in the same subprocess, each of its calls
  right after ours, and prints the ratios of the best times and the largest difference between
  the two libraries' metrics.
* ``--flat-index`` also times a plain faiss ``IndexFlatIP`` k-NN search (k = R_max + 1) of the
  same embeddings, for comparison.

    python benchmarks/bench_metrics.py [--sizes cub cars sop] [--repeats 3] [--threads 1 2]
        [--pml] [--flat-index]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from functools import partial

import numpy as np
from common import load_average, measure_in_child, print_table

DIMENSIONS = 512

# name: (samples, classes, smallest class, largest class, ks); the Cars range is approximate.
DATA_SETS = {
    "cub": (5_924, 100, 41, 60, (1, 2, 4, 8)),
    "cars": (8_131, 98, 45, 136, (1, 2, 4, 8)),
    "sop": (60_502, 11_316, 2, 12, (1, 10, 100, 1000)),
}

# Our name of each metric: pytorch-metric-learning's name of the same number.
PML_NAMES = {
    "recall@1": "precision_at_1",
    "map@r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
}


def class_sizes(n_samples, n_classes, smallest, largest, rng):
    """Random class sizes in ``[smallest, largest]`` that sum to ``n_samples``.

    Sizes are drawn from a geometric-like law whose decay is tuned so that the mean is right (most
    SOP products have few images), then classes grow or shrink by one sample at a time to hit the
    total exactly.
    """
    excess = np.arange(largest - smallest + 1)
    target = n_samples / n_classes - smallest
    low, high = -20.0, 20.0  # decay rate of the weights: positive favours small classes
    for _ in range(60):
        decay = (low + high) / 2
        weights = np.exp(-decay * excess / len(excess))
        mean_excess = (weights * excess).sum() / weights.sum()
        low, high = (decay, high) if mean_excess > target else (low, decay)
    sizes = smallest + rng.choice(excess, n_classes, p=weights / weights.sum())
    while shortfall := n_samples - sizes.sum():
        room = np.flatnonzero(sizes < largest if shortfall > 0 else sizes > smallest)
        sizes[rng.choice(room, min(abs(shortfall), len(room)), replace=False)] += np.sign(shortfall)
    return sizes


def clustered_embeddings(n_samples, n_classes, smallest, largest, seed=0):
    """Gaussian clusters around random centres, noisy enough that retrieval is imperfect."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n_samples, n_classes, smallest, largest, rng)
    labels = np.repeat(np.arange(n_classes), sizes)
    rng.shuffle(labels)
    centres = rng.standard_normal((n_classes, DIMENSIONS), dtype=np.float32)
    noise = rng.standard_normal((n_samples, DIMENSIONS), dtype=np.float32)
    return centres[labels] + 2.5 * noise, labels


def best_seconds(function, repeats):
    """Wall and CPU seconds of the fastest of ``repeats`` calls, and the last result."""
    timings = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        result = function()
        timings.append((time.perf_counter() - start, _cpu_seconds() - cpu_start))
    wall, cpu = min(timings)
    return wall, cpu, result


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sgemm_gflops():
    """Best sgemm rate of ``torch.mm`` on one 4096 × 4096 × 512 score tile, in GFLOP/s."""
    import torch

    a = torch.randn(4096, DIMENSIONS, generator=torch.Generator().manual_seed(0))
    b = torch.randn(4096, DIMENSIONS, generator=torch.Generator().manual_seed(1))
    seconds, _, _ = best_seconds(lambda: a @ b.T, repeats=5)
    return 2 * len(a) * len(b) * DIMENSIONS / seconds / 1e9


def run_one(name, path, repeats, threads, pml, flat_index):
    """Measure one size inside a fresh process; returns a JSON-able dict.

    Each repeat calls ``retrieval_metrics`` once per thread count, then PML's calculator, so that
    all of them share whatever else the machine is running.
    """
    import torch

    from gca_pyg.metrics import retrieval_metrics

    ks = DATA_SETS[name][4]
    with np.load(path) as data:
        embeddings, labels = data["embeddings"], data["labels"]
    threads = threads or [torch.get_num_threads()]
    calls = {
        f"threads={n}": partial(retrieval_metrics, embeddings, labels, ks, num_threads=n)
        for n in threads
    }
    retrieval_metrics(embeddings[:200], labels[:200], (1,))  # load libraries, start thread pools
    if pml:
        calls["pml"] = pml_accuracy(embeddings, labels)
        pml_accuracy(embeddings[:200], labels[:200])()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timings, results = {key: [] for key in calls}, {}
    for repeat in range(repeats):
        for key, call in calls.items():
            timings[key].append(timed(call))
            results[key] = timings[key][-1][2]
            if repeat == 0 and key == f"threads={threads[-1]}":
                peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics = results[f"threads={threads[0]}"]
    result = {
        "ours": [
            {
                "threads": n,
                "seconds": min(timings[f"threads={n}"])[0],
                "cpu_seconds": min(timings[f"threads={n}"])[1],
            }
            for n in threads
        ],
        "same_for_all_threads": all(results[f"threads={n}"] == metrics for n in threads),
        "peak_rise_mib": (peak_kib - baseline_kib) / 1024,
        "gflops": sgemm_gflops(),
        "metrics": metrics,
    }
    if pml:
        pml_metrics = results["pml"]
        result["pml"] = {
            "seconds": min(timings["pml"])[0],
            "cpu_seconds": min(timings["pml"])[1],
            "metrics": pml_metrics,
        }
        result["pml"]["largest_difference"] = max(
            abs(metrics[ours] - pml_metrics[theirs]) for ours, theirs in PML_NAMES.items()
        )
    if flat_index:
        result["flat_index_seconds"] = flat_index_seconds(embeddings, labels)
    return result


def timed(function):
    """Wall and CPU seconds of one call, and its result."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = function()
    return time.perf_counter() - start, _cpu_seconds() - cpu_start, result


def pml_accuracy(embeddings, labels):
    """A call of pytorch-metric-learning's ``AccuracyCalculator`` on these embeddings.

    It computes the metrics both libraries have, with ``k="max_bin_count"``: its default
    (``k=None``) retrieves all N neighbours of every sample, N² · 12 bytes (44 GB at SOP's size).
    The L2 normalisation is part of the call, as it is of ``retrieval_metrics``.
    """
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu")
    )
    embeddings, labels = torch.from_numpy(embeddings), torch.from_numpy(labels)
    return lambda: calculator.get_accuracy(torch.nn.functional.normalize(embeddings), labels)


def flat_index_seconds(embeddings, labels):
    """Time of a faiss IndexFlatIP search of every sample, k = largest class (R_max + 1)."""
    import faiss

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    k = int(np.bincount(labels).max())
    seconds, _, _ = best_seconds(lambda: index.search(unit, k), repeats=1)
    return seconds


def measure(name, directory, repeats, threads, pml, flat_index):
    """Write one synthetic data set and measure it in a fresh Python process."""
    n_samples, n_classes, smallest, largest, _ = DATA_SETS[name]
    embeddings, labels = clustered_embeddings(n_samples, n_classes, smallest, largest)
    path = os.path.join(directory, f"{name}.npz")
    np.savez(path, embeddings=embeddings, labels=labels)
    result = measure_in_child(
        __file__,
        {
            "name": name,
            "path": path,
            "repeats": repeats,
            "threads": threads,
            "pml": pml,
            "flat_index": flat_index,
        },
    )
    if "error" in result:
        sys.exit(f"{name}: {result['error']}")
    result["r_max"] = int(np.bincount(labels).max()) - 1
    result["input_mib"] = embeddings.nbytes / 2**20
    return result


def table_rows(name, result):
    """The printed table's rows of one size, one per thread count."""
    n_samples, n_classes, _, _, ks = DATA_SETS[name]
    full_floor = 2 * n_samples**2 * DIMENSIONS / (result["gflops"] * 1e9)
    rows = []
    for ours in result["ours"]:
        row = [
            name,
            f"{n_samples:,}",
            f"{n_classes:,}",
            str(result["r_max"]),
            ",".join(map(str, ks)),
            str(ours["threads"]),
            f"{ours['seconds']:.2f}",
            f"{ours['cpu_seconds']:.1f}",
            f"{result['peak_rise_mib']:.0f}",
            f"{result['input_mib']:.0f}",
            f"{result['gflops']:.0f}",
            f"{full_floor:.2f}",
            f"{full_floor / 2:.2f}",
            f"{ours['seconds'] / (full_floor / 2):.2f}",
        ]
        if "pml" in result:
            pml = result["pml"]
            row += [
                f"{pml['seconds']:.2f}",
                f"{pml['cpu_seconds']:.1f}",
                f"{ours['seconds'] / pml['seconds']:.2f}",
                f"{ours['cpu_seconds'] / pml['cpu_seconds']:.2f}",
                f"{pml['largest_difference']:.0e}",
            ]
        if "flat_index_seconds" in result:
            row.append(f"{result['flat_index_seconds']:.2f}")
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(DATA_SETS), default=list(DATA_SETS))
    parser.add_argument(
        "--repeats", type=int, default=3, help="calls per size; the best time is kept"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="num_threads of retrieval_metrics, one row each (default: torch's)",
    )
    parser.add_argument(
        "--pml", action="store_true", help="also time pytorch-metric-learning's AccuracyCalculator"
    )
    parser.add_argument(
        "--flat-index", action="store_true", help="also time a plain faiss IndexFlatIP search"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = json.loads(args.child)
        print(
            json.dumps(
                run_one(
                    child["name"],
                    child["path"],
                    child["repeats"],
                    child["threads"],
                    child["pml"],
                    child["flat_index"],
                )
            )
        )
        return

    header = [
        "data set",
        "N",
        "classes",
        "R_max",
        "ks",
        "threads",
        "time s",
        "CPU s",
        "peak rise MiB",
        "input MiB",
        "GFLOP/s",
        "floor 2N²D s",
        "floor N²D s",
        "time / N²D floor",
    ]
    if args.pml:
        header += ["PML s", "PML CPU s", "time / PML", "CPU / PML", "max |Δ| vs PML"]
    header += ["IndexFlatIP s"] if args.flat_index else []
    rows = []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as directory:
        for name in args.sizes:
            result = measure(name, directory, args.repeats, args.threads, args.pml, args.flat_index)
            print(f"{name}: {json.dumps(result['metrics'])}", file=sys.stderr)
            if not result["same_for_all_threads"]:
                print(f"{name}: the metrics differ between thread counts", file=sys.stderr)
            if "pml" in result:
                print(f"{name} PML: {json.dumps(result['pml']['metrics'])}", file=sys.stderr)
            rows += table_rows(name, result)
    print_table(header, rows)
    print(f"load average before: {load_before}; after: {load_average()}")


if __name__ == "__main__":
    main()
