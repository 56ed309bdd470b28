"""Gallery search at scale: build time, memory, query latency and recall@10 of every index kind of
``gca_pyg.vector_index`` (what ``python -m gca_pyg.index --index KIND`` builds), in one table.

Data: N synthetic embeddings of D = 512 dimensions, clustered as trained embeddings are: class
centres on the unit sphere, grouped under super-classes of about 20 classes (as products under
categories); each item is its class centre plus Gaussian noise of a spread drawn per class,
L2-normalised. Classes hold 2 to 60 items. The noise is set so that an item's nearest neighbour is
of its class about 75% of the time (Recall@1 ≈ 0.75 at N = 20,000, like a good model on Stanford
Online Products): neighbours are close but not separated, which is what makes approximate search
lose recall. The queries are ``--queries`` more items drawn the same way, never in the gallery.

Every row builds one index the way the index command does (``build_index``: the smallest search
breadth whose recall@10 against exact search, less two standard errors, reaches 0.95 on 1,000
gallery rows held out of the index while they are measured) and reports:

* build s: training (IVF's k-means, the codes), adding the N rows and choosing the breadth;
* memory MB: the size of the index as faiss writes it, which is what it holds in memory (the
  vectors or their codes, plus the graph or lists), and its share of the flat index's;
* query latency at batch 1 (``--single`` queries one at a time) and at batch 64, p50 and p99 of
  the wall time of one search (``gca_pyg.vector_index.search``, re-ranking included), after a
  warm-up, at most a minute of calls each (at least 5);
* recall@10 against exact search: "calibrated", on the held-out gallery rows the breadth was chosen
  on (± one standard error), and "queries", on the ``--queries`` held-out queries;
* the 1-minute load average before and after the row, since on a shared machine it moves latency
  more than the method does.

Re-ranking reads its shortlist's rows from the stored vectors memory-mapped, as an index folder's
``embeddings.npy`` is (here written to a temporary file, so in the page cache). Exact search is
bounded by memory bandwidth: each size prints the floor, the time one matrix-vector product takes
to stream the N × D floats (torch, all threads).

    python benchmarks/bench_index.py [--sizes 10000 100000 1000000]
        [--kinds flat ivf hnsw ivf-sq8 ivf-pq] [--dim 512] [--queries 1000] [--single 300]
        [--rerank 10]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import load_average, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gca_pyg.vector_index import (  # noqa: E402
    INDEX_KINDS,
    RERANK_FACTOR,
    build_index,
    exact_search,
    recall_at_k,
    search,
    unit_rows,
)

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


def latencies_ms(
    find, queries: np.ndarray, batch: int, calls: int, budget: float = BUDGET_S
) -> tuple[float, float]:
    """p50 and p99 wall time of one search (`find`) of `batch` queries, over `calls` calls, or as
    many as `budget` seconds allow (at least 5)."""
    starts = np.arange(calls) * batch % max(1, len(queries) - batch + 1)
    find(queries[:batch])  # warm-up
    times = []
    for start in starts:
        began = time.perf_counter()
        find(queries[start : start + batch])
        times.append(time.perf_counter() - began)
        if sum(times) > budget and len(times) >= 5:
            break
    p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
    return float(p50), float(p99)


def index_megabytes(index) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path) / 2**20


def streaming_floor_ms(gallery: np.ndarray) -> tuple[float, float]:
    """The best of 5 matrix-vector products over `gallery` (ms), and the read bandwidth it
    implies (GB/s): the least time any exact search of one query can take."""
    rows, vector = torch.from_numpy(gallery), torch.from_numpy(gallery[0].copy())
    times = []
    for _ in range(5):
        began = time.perf_counter()
        rows @ vector
        times.append(time.perf_counter() - began)
    return min(times) * 1e3, gallery.nbytes / min(times) / 1e9


def faiss_flat_latencies(gallery: np.ndarray, queries: np.ndarray) -> str:
    """p50 of faiss's own ``IndexFlatIP.search`` at batch 1 and 64 (20 and 5 calls at most), to
    set beside the flat row, which searches by blocked matrix products."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    b1 = latencies_ms(lambda batch: index.search(batch, K), queries, 1, 20, budget=20.0)
    b64 = latencies_ms(lambda batch: index.search(batch, K), queries, BATCH, 5, budget=20.0)
    return f"faiss IndexFlatIP.search itself: b1 p50 {b1[0]:.2f} ms, b64 p50 {b64[0]:.1f} ms"


def measure(
    kind: str, gallery, queries, exact, single: int, folder: str, rerank: int
) -> tuple[list, float]:
    began = time.perf_counter()
    index, settings, order = build_index(gallery, kind, rerank=rerank)
    built = time.perf_counter() - began
    vectors = None
    if settings.rerank:  # the stored vectors in the index's order, memory-mapped as in a folder
        path = os.path.join(folder, "embeddings.npy")
        np.save(path, gallery[order])
        vectors = np.load(path, mmap_mode="r")

    def find(batch):
        return search(index, settings, batch, K, vectors)

    _, found = find(queries)
    found = np.where(found >= 0, order[found], -1)  # ids of the index -> rows of the gallery
    b1 = latencies_ms(find, queries, 1, single)
    b64 = latencies_ms(find, queries, BATCH, max(10, single // 10))
    calibrated = (
        f"{settings.recall:.3f} ± {settings.recall_se:.3f}"
        if settings.recall_se is not None
        else "-"
    )
    megabytes = index_megabytes(index)
    row = [
        f"{len(gallery):,}",
        settings.describe(),
        f"{built:.1f}",
        f"{megabytes:.1f}",
        "",
        f"{b1[0]:.2f}",
        f"{b1[1]:.2f}",
        f"{b64[0]:.1f}",
        f"{b64[1]:.1f}",
        calibrated,
        f"{recall_at_k(found, exact):.3f}",
    ]
    return row, megabytes


HEADER = [
    "N",
    "index",
    "build s",
    "memory MB",
    "of flat",
    "b1 p50 ms",
    "b1 p99 ms",
    "b64 p50 ms",
    "b64 p99 ms",
    "recall@10 calibrated",
    "recall@10 queries",
    "load",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--kinds", nargs="+", default=list(INDEX_KINDS[1:]), choices=INDEX_KINDS[1:]
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    parser.add_argument(
        "--rerank",
        type=int,
        default=RERANK_FACTOR,
        help=f"the compressed kinds' shortlist, × k (default {RERANK_FACTOR}; 1: no re-ranking)",
    )
    args = parser.parse_args(argv)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; D = {args.dim}"
    )
    rows = []
    for size in args.sizes:
        gallery, queries = clustered_embeddings(size, args.queries, args.dim)
        floor_ms, bandwidth = streaming_floor_ms(gallery)
        print(
            f"N = {size:,}: streaming the {gallery.nbytes / 1e9:.2f} GB of vectors once takes "
            f"{floor_ms:.1f} ms ({bandwidth:.1f} GB/s), the floor of exact search",
            flush=True,
        )
        began = time.perf_counter()
        _, exact = exact_search(gallery, queries, K)
        print(
            f"  exact search of the {len(queries):,} queries (the oracle, one call): "
            f"{time.perf_counter() - began:.2f} s",
            flush=True,
        )
        if "flat" in args.kinds:
            print(f"  {faiss_flat_latencies(gallery, queries)}", flush=True)
        flat_megabytes = gallery.nbytes / 2**20
        with tempfile.TemporaryDirectory() as folder:
            for kind in args.kinds:
                before = load_average().split()[0]
                row, megabytes = measure(
                    kind, gallery, queries, exact, args.single, folder, args.rerank
                )
                row[4] = f"{megabytes / flat_megabytes:.0%}"
                rows.append(row + [f"{before} -> {load_average().split()[0]}"])
                print(f"  {' | '.join(rows[-1])}", flush=True)
        del gallery, queries
    print()
    print_table(HEADER, rows)
    print(f"\nload average at the end: {load_average()} (1, 5, 15 min: {os.getloadavg()})")


if __name__ == "__main__":
    main()
