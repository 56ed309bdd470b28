"""Gallery search at scale: build time, memory, query latency and recall@10 of the exact, IVF and
HNSW indexes of ``gca_pyg.vector_index`` (what ``python -m gca_pyg.index`` builds), in one table.

Data: N synthetic embeddings of D = 512 dimensions, clustered as trained embeddings are: class
centres on the unit sphere, grouped under super-classes of about 20 classes (as products under
categories); each item is its class centre plus Gaussian noise of a spread drawn per class,
L2-normalised. Classes hold 2 to 60 items. The noise is set so that an item's nearest neighbour is
of its class about 75% of the time (Recall@1 ≈ 0.75 at N = 20,000, like a good model on Stanford
Online Products): neighbours are close but not separated, which is what makes approximate search
lose recall. The queries are ``--queries`` more items drawn the same way, kept out of the gallery.

Every row builds one index the way the index command does (``build_index``: the smallest search
breadth whose recall@10 against exact search reaches 0.95 on 1,000 gallery rows held out of the
index while they are measured) and reports:

* build s: training (IVF's k-means), adding the N rows and choosing the breadth;
* memory MB: the size of the index as faiss writes it (the vectors, plus the graph or lists);
* query latency at batch 1 (``--single`` queries one at a time) and at batch 64, p50 and p99 of
  the wall time of one ``search`` call, after a warm-up (at most a minute of calls each, at least
  5: for exact search of 10⁶ rows the p99 is then the slowest of a few);
* recall@10 of the held-out queries against exact search (1 for exact search itself).

faiss runs with its default threads (all CPUs); the load average before and after every row is
printed, since on a shared machine it moves latency much more than the method does.

    python benchmarks/bench_index.py [--sizes 10000 100000 1000000] [--kinds flat ivf hnsw]
        [--dim 512] [--queries 1000] [--single 300]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from common import load_average, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gca_pyg.vector_index import build_index, exact_search, recall_at_k, unit_rows  # noqa: E402

K = 10
BATCH = 64
BLOCK = 100_000  # rows generated at a time
BUDGET_S = 60.0  # most seconds of timed calls per latency


def clustered_embeddings(count: int, queries: int, dim: int, seed: int = 0):
    """`count` gallery rows and `queries` held-out rows of the same classes, unit float32."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 61, size=count // 2 + 1)
    classes = int(np.searchsorted(np.cumsum(sizes), count)) + 1
    supers = max(1, classes // 20)
    super_centres = unit_rows(rng.standard_normal((supers, dim), dtype=np.float32))
    centres = unit_rows(
        super_centres[rng.integers(0, supers, classes)]
        + 0.7 * rng.standard_normal((classes, dim), dtype=np.float32) / np.sqrt(dim)
    )
    spread = rng.uniform(1.2, 2.2, size=classes).astype(np.float32)
    labels = np.repeat(np.arange(classes), sizes[:classes])[:count]
    query_labels = rng.choice(labels, queries)
    out = []
    for wanted in (labels, query_labels):
        rows = np.empty((len(wanted), dim), dtype=np.float32)
        for start in range(0, len(wanted), BLOCK):
            part = wanted[start : start + BLOCK]
            noise = rng.standard_normal((len(part), dim), dtype=np.float32) / np.sqrt(dim)
            rows[start : start + BLOCK] = unit_rows(centres[part] + spread[part, None] * noise)
        out.append(rows)
    return out


def latencies_ms(index, queries: np.ndarray, batch: int, calls: int) -> tuple[float, float]:
    """p50 and p99 wall time of one ``search`` of `batch` queries, over `calls` calls, or as many
    as :data:`BUDGET_S` seconds allow (at least 5: exact search of a large gallery is slow)."""
    starts = np.arange(calls) * batch % max(1, len(queries) - batch + 1)
    index.search(queries[:batch], K)  # warm-up
    times = []
    for start in starts:
        began = time.perf_counter()
        index.search(queries[start : start + batch], K)
        times.append(time.perf_counter() - began)
        if sum(times) > BUDGET_S and len(times) >= 5:
            break
    p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
    return float(p50), float(p99)


def index_megabytes(index) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path) / 2**20


def measure(kind: str, gallery, queries, exact, single: int) -> list:
    began = time.perf_counter()
    index, settings, order = build_index(gallery, kind)
    built = time.perf_counter() - began
    _, found = index.search(queries, K)
    found = np.where(found >= 0, order[found], -1)  # ids of the index -> rows of the gallery
    b1 = latencies_ms(index, queries, 1, single)
    b64 = latencies_ms(index, queries, BATCH, max(10, single // 10))
    row = [
        f"{len(gallery):,}",
        settings.describe(),
        f"{built:.1f}",
        f"{index_megabytes(index):.0f}",
        f"{b1[0]:.2f}",
        f"{b1[1]:.2f}",
        f"{b64[0]:.1f}",
        f"{b64[1]:.1f}",
        f"{recall_at_k(found, exact):.3f}",
    ]
    del index
    return row


HEADER = [
    "N",
    "index",
    "build s",
    "memory MB",
    "b1 p50 ms",
    "b1 p99 ms",
    "b64 p50 ms",
    "b64 p99 ms",
    "recall@10",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    args = parser.parse_args(argv)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; D = {args.dim}")
    rows = []
    for size in args.sizes:
        gallery, queries = clustered_embeddings(size, args.queries, args.dim)
        _, exact = exact_search(gallery, queries, K)
        for kind in args.kinds:
            before = load_average()
            rows.append(measure(kind, gallery, queries, exact, args.single))
            print(f"  {' | '.join(rows[-1])}   (load {before} -> {load_average()})", flush=True)
        del gallery, queries
    print()
    print_table(HEADER, rows)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
