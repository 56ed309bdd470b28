"""Time and peak memory of ``retrieval_metrics`` at the test-set sizes of CUB, Cars and SOP.

Each size runs in a fresh subprocess on synthetic clustered 512-d embeddings with the data set's
number of classes and range of class sizes, and the ks of SPEC.md §7.

* Time: the best wall time of ``--repeats`` calls, and the CPU time (user + system, all threads)
  of that call: on a machine shared with other work the wall time grows, the CPU time much less.
* Memory: how far the call raises the process's peak resident set size (``ru_maxrss`` from
  ``resource.getrusage``, Linux), which sees faiss, BLAS and numpy allocations alike; the embeddings
  are loaded and a small warm-up call made before the baseline is read.
* Floor: the time of the N²·D multiply-adds (2·N²·D flops) of all query × gallery scores at the
  sgemm rate that numpy's BLAS reaches on one 4096 × 4096 × 512 tile, measured in the same
  subprocess right after the calls. With the gallery as its own query set the score matrix is
  symmetric and ``retrieval_metrics`` computes one triangle, so half that floor is its own floor.
* ``--flat-index`` also times a plain faiss ``IndexFlatIP`` k-NN search (k = R_max + 1) of the
  same embeddings, for comparison.

    python benchmarks/bench_metrics.py [--sizes cub cars sop] [--repeats 3] [--flat-index]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

from common import measure_in_child, print_table

DIMENSIONS = 512

# name: (samples, classes, smallest class, largest class, ks); the Cars range is approximate.
DATA_SETS = {
    "cub": (5_924, 100, 41, 60, (1, 2, 4, 8)),
    "cars": (8_131, 98, 45, 136, (1, 2, 4, 8)),
    "sop": (60_502, 11_316, 2, 12, (1, 10, 100, 1000)),
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
    """Best sgemm rate of numpy's BLAS on one 4096 × 4096 × 512 score tile, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, DIMENSIONS), dtype=np.float32)
    b = rng.standard_normal((4096, DIMENSIONS), dtype=np.float32)
    seconds, _, _ = best_seconds(lambda: a @ b.T, repeats=5)
    return 2 * len(a) * len(b) * DIMENSIONS / seconds / 1e9


def run_one(name, path, repeats, flat_index):
    """Measure one size inside a fresh process; returns a JSON-able dict."""
    from gca_pyg.metrics import retrieval_metrics

    ks = DATA_SETS[name][4]
    with np.load(path) as data:
        embeddings, labels = data["embeddings"], data["labels"]
    retrieval_metrics(embeddings[:200], labels[:200], (1,))  # load libraries, start thread pools
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, cpu_seconds, metrics = best_seconds(
        lambda: retrieval_metrics(embeddings, labels, ks), repeats
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rise_mib": (peak_kib - baseline_kib) / 1024,
        "gflops": sgemm_gflops(),
        "metrics": metrics,
    }
    if flat_index:
        result["flat_index_seconds"] = flat_index_seconds(embeddings, labels)
    return result


def flat_index_seconds(embeddings, labels):
    """Time of a faiss IndexFlatIP search of every sample, k = largest class (R_max + 1)."""
    import faiss

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    k = int(np.bincount(labels).max())
    seconds, _, _ = best_seconds(lambda: index.search(unit, k), repeats=1)
    return seconds


def measure(name, directory, repeats, flat_index):
    """Write one synthetic data set and measure it in a fresh Python process."""
    n_samples, n_classes, smallest, largest, _ = DATA_SETS[name]
    embeddings, labels = clustered_embeddings(n_samples, n_classes, smallest, largest)
    path = os.path.join(directory, f"{name}.npz")
    np.savez(path, embeddings=embeddings, labels=labels)
    result = measure_in_child(__file__, {"name": name, "path": path, "repeats": repeats,
                                         "flat_index": flat_index})
    if "error" in result:
        sys.exit(f"{name}: {result['error']}")
    result["r_max"] = int(np.bincount(labels).max()) - 1
    result["input_mib"] = embeddings.nbytes / 2**20
    return result


def table_row(name, result):
    """One row of the printed table."""
    n_samples, n_classes, _, _, ks = DATA_SETS[name]
    full_floor = 2 * n_samples**2 * DIMENSIONS / (result["gflops"] * 1e9)
    row = [name, f"{n_samples:,}", f"{n_classes:,}", str(result["r_max"]), ",".join(map(str, ks)),
           f"{result['seconds']:.2f}", f"{result['cpu_seconds']:.1f}",
           f"{result['peak_rise_mib']:.0f}",
           f"{result['input_mib']:.0f}", f"{result['gflops']:.0f}", f"{full_floor:.2f}",
           f"{full_floor / 2:.2f}", f"{result['seconds'] / (full_floor / 2):.2f}"]
    if "flat_index_seconds" in result:
        row.append(f"{result['flat_index_seconds']:.2f}")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(DATA_SETS), default=list(DATA_SETS))
    parser.add_argument("--repeats", type=int, default=3,
                        help="calls per size; the best time is kept")
    parser.add_argument("--flat-index", action="store_true",
                        help="also time a plain faiss IndexFlatIP search")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = json.loads(args.child)
        print(json.dumps(run_one(child["name"], child["path"], child["repeats"],
                                 child["flat_index"])))
        return

    header = ["data set", "N", "classes", "R_max", "ks", "time s", "CPU s", "peak rise MiB",
              "input MiB", "GFLOP/s", "floor 2N²D s", "floor N²D s", "time / N²D floor"]
    header += ["IndexFlatIP s"] if args.flat_index else []
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.sizes:
            result = measure(name, directory, args.repeats, args.flat_index)
            print(f"{name}: {json.dumps(result['metrics'])}", file=sys.stderr)
            rows.append(table_row(name, result))
    print_table(header, rows)


if __name__ == "__main__":
    main()
