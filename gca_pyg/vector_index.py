r"""Nearest-neighbour search over L2-normalised embeddings with faiss: exact, approximate or
compressed.

All indexes rank by inner product, which for unit vectors is the cosine similarity. Each kind is
named by the faiss ``index_factory`` string that builds it:

* ``flat`` — exact search (``Flat``, an ``IndexFlatIP``): every query is compared with every
  gallery row, by one matrix product per block of rows and queries (:func:`exact_search`);
* ``ivf`` — an inverted file (``IVF{nlist},Flat``): k-means splits the gallery into ``nlist`` cells
  and a query scans the ``nprobe`` cells whose centroids are nearest;
* ``hnsw`` — a hierarchical navigable small-world graph (``HNSW{M},Flat``, ``M`` links per node):
  a query walks the graph, keeping the ``efSearch`` best candidates;
* ``ivf-sq8`` and ``ivf-pq`` — an inverted file of compressed codes instead of the vectors
  (``IVF{nlist},SQ8``: one byte per dimension, a quarter of the floats; ``IVF{nlist},PQ{D/8}``:
  one byte per 8 dimensions, a thirty-second). Their scores are approximate, so by default the
  ``rerank`` × k best of a query by its codes are scored again exactly from the stored vectors
  (faiss's ``k_factor``; the rows are read from ``embeddings.npy``, which need not fit in memory).

The approximate kinds trade recall for speed through their search breadth (``nprobe``,
``efSearch``). :func:`build_index` sets it to the smallest value whose recall@k against exact
search reaches a target,

.. math::
    \mathrm{recall@}k = \frac{1}{|Q|} \sum_{q \in Q}
    \frac{|\mathrm{approx}_k(q) \cap \mathrm{exact}_k(q)|}{k},

with a margin: the recall of the sample minus :data:`RECALL_MARGIN` standard errors of its mean
must reach the target, so that other queries drawn alike reach it too and not just these. The
queries :math:`Q` are a seeded sample of gallery rows held out of the index while it is measured
(then added, last: the index holds the rows in the order :func:`build_index` returns): they are new
images to it, as real queries are. (A row already in an HNSW graph is linked to its neighbours, and
would overstate the recall of new images.) ``auto`` picks exact search up to :data:`EXACT_LIMIT`
rows and IVF beyond, the choice that ``benchmarks/bench_index.py`` measures.
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import faiss
import numpy as np
import torch

from gca_pyg.errors import ConfigError
from gca_pyg.metrics import unit_rows

__all__ = [
    "INDEX_KINDS",
    "EXACT_LIMIT",
    "TARGET_RECALL",
    "RERANK_FACTOR",
    "IndexSettings",
    "choose_kind",
    "build_index",
    "append_rows",
    "set_breadth",
    "search",
    "unit_rows",
    "check_vectors",
    "exact_search",
    "recall_at_k",
    "recall_per_query",
]

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "ivf-sq8", "ivf-pq")
#: The codes an inverted file stores per row, by kind (``ivf-pq``: one byte per 8 dimensions).
CODES = {"ivf": "Flat", "ivf-sq8": "SQ8", "ivf-pq": "PQ"}
#: Largest gallery that ``auto`` searches exactly. Exact search streams the N·D floats once per
#: batch of queries: about 4 ms for 50,000 rows of 512 on this machine's two cores, growing
#: linearly with N; beyond it, ``auto`` builds IVF, which in ``benchmarks/bench_index.py`` built
#: faster than HNSW and answered single queries as fast at the same recall.
EXACT_LIMIT = 50_000
#: The recall@10 against exact search that :func:`build_index` aims at by default.
TARGET_RECALL = 0.95
#: Standard errors of the sample's mean recall kept between it and the target.
RECALL_MARGIN = 2.0
#: The shortlist of a compressed index re-ranked exactly, in multiples of k (faiss's k_factor).
RERANK_FACTOR = 10
#: Links per node of an HNSW graph, and the candidates kept while inserting. faiss's default
#: efConstruction, 40, built 1.5x faster in benchmarks/bench_index.py's data but a graph too sparse
#: between clusters: efSearch 128 for recall@10 0.956 at 10⁵ (80: 0.980 at efSearch 48), and 0.87
#: at efSearch 1,024 at 10⁶.
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80
#: Training rows per IVF cell (faiss warns below 39) and k-means iterations.
IVF_TRAIN_PER_CELL, IVF_TRAIN_ITERATIONS = 40, 10
#: Training rows of product-quantisation codes (256 centroids per sub-vector, 39 rows each), and
#: the fewest rows an ``ivf-pq`` index is built from.
PQ_TRAIN, PQ_MIN_ROWS = 256 * 39, 1000
#: Search breadths that :func:`build_index` tries, in order.
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
#: Scores held at once by :func:`exact_search` (queries × gallery rows of one block): 64 MB.
EXACT_BLOCK_SCORES = 2**24
#: Multiply-adds (gallery rows × queries × D) below which :func:`exact_search` leaves a search to
#: faiss's one-thread loop: about 2 ms of work, less than waking a second thread costs on a busy
#: machine (6 ms measured at load 3 on two cores).
EXACT_THREADED_WORK = 2**24


@dataclass
class IndexSettings:
    """How an index was built and is searched, as stored in an index folder's manifest.

    Attributes:
        kind: ``flat``, ``ivf``, ``hnsw``, ``ivf-sq8`` or ``ivf-pq``.
        nlist: IVF cells.
        nprobe: IVF cells scanned per query.
        m: HNSW links per node.
        ef_search: HNSW candidates kept per query.
        codes: The faiss code of each row of an inverted file (``Flat``, ``SQ8``, ``PQ64``).
        rerank: The shortlist re-scored exactly from the stored vectors, in multiples of k (None:
            the index's own scores).
        recall: Recall@k against exact search on held-out rows (1 for ``flat``).
        recall_k: The k of `recall`.
        recall_se: The standard error of `recall` (the spread of its queries' recalls / √n).
        recall_queries: How many held-out rows `recall` was measured on.
    """

    kind: str = "flat"
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    m: Optional[int] = None
    ef_search: Optional[int] = None
    codes: Optional[str] = None
    rerank: Optional[int] = None
    recall: Optional[float] = None
    recall_k: Optional[int] = None
    recall_se: Optional[float] = None
    recall_queries: Optional[int] = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "IndexSettings":
        settings = cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
        if settings.kind == "ivf" and settings.codes is None:  # written before codes were named
            settings.codes = "Flat"
        return settings

    @property
    def factory(self) -> str:
        """The faiss ``index_factory`` string of the index."""
        if self.kind == "hnsw":
            return f"HNSW{self.m},Flat"
        if self.kind == "flat":
            return "Flat"
        return f"IVF{self.nlist},{self.codes}"

    def describe(self) -> str:
        if self.kind == "hnsw":
            return f"{self.factory} (efSearch {self.ef_search})"
        if self.kind == "flat":
            return "Flat (exact)"
        shortlist = f"; its best {self.rerank}×k re-ranked exactly" if self.rerank else ""
        return f"{self.factory} (nprobe {self.nprobe}{shortlist})"


def choose_kind(kind: str, count: int) -> str:
    """`kind`, or for ``auto`` exact search up to :data:`EXACT_LIMIT` rows and IVF beyond."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if count <= EXACT_LIMIT else "ivf"


def ivf_cells(count: int) -> int:
    """IVF cells for `count` rows: the power of two nearest 4·√count, with at least
    :data:`IVF_TRAIN_PER_CELL` rows per cell to train on."""
    cells = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return int(max(1, min(cells, count // IVF_TRAIN_PER_CELL)))


def pq_codes(dim: int) -> str:
    """``PQ{m}``: the most sub-vectors of at least 8 dimensions that divide `dim` evenly."""
    m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    return f"PQ{m}"


def check_vectors(x: np.ndarray, what: str, dim: Optional[int] = None) -> np.ndarray:
    """`x` as float32 rows :math:`(N, D)` with `dim` columns where given.

    Raises:
        ConfigError: One line naming `what` and the fault: not 2-D, not floating point, another
            size, a row with NaN or infinite values, a row of zeros (no direction to search by).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(
            f"{what} are an array of shape {x.shape}; expected (rows, dim), one row per item"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(
            f"{what} hold {x.dtype} values; expected floating-point embeddings (float32; "
            "float16 and float64 are converted)"
        )
    if dim is not None and x.shape[1] != dim:
        raise ConfigError(
            f"{what} have {x.shape[1]} dimensions and the gallery's embeddings {dim}; use "
            "vectors of the model that embedded the gallery"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    squares = np.concatenate(
        [np.einsum("ij,ij->i", x[i : i + 65536], x[i : i + 65536]) for i in range(0, len(x), 65536)]
        or [np.empty(0, np.float32)]
    )
    for fault, rows in (
        ("NaN or infinite values", np.flatnonzero(~np.isfinite(squares))),
        ("only zeros, no direction to search by", np.flatnonzero(squares == 0)),
    ):
        if len(rows):
            more = f" (and {len(rows) - 1:,} more)" if len(rows) > 1 else ""
            raise ConfigError(f"{what}: row {rows[0]}{more} holds {fault}; fix or drop it")
    return x


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    target: float = TARGET_RECALL,
    k: int = 10,
    sample: int = 1000,
    seed: int = 0,
    rerank: Optional[int] = RERANK_FACTOR,
) -> tuple[faiss.Index, IndexSettings, np.ndarray]:
    """An index of `embeddings` (unit rows) of `kind` (``auto`` resolved by :func:`choose_kind`).
    An approximate kind gets the smallest search breadth on its ladder whose recall@`k` against
    exact search reaches `target` with a margin of :data:`RECALL_MARGIN` standard errors, on
    `sample` seeded rows held out of the index while they are measured (at most a tenth of the
    rows); if none does, the widest. A compressed kind re-ranks the best `rerank` × k of its
    codes exactly (None or 1: it does not).

    Shapes:
        - **embeddings:** :math:`(N, D)`

    Returns:
        The index, its settings (with the measured recall), and the order of the rows in it: id
        ``i`` of the index is row ``order[i]`` (the held-out rows last; ``arange(N)`` for exact
        search).

    Raises:
        ConfigError: If ``ivf-pq`` is asked for fewer than :data:`PQ_MIN_ROWS` rows.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = embeddings.shape
    kind = choose_kind(kind, count)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(embeddings)
        return index, IndexSettings("flat", recall=1.0), np.arange(count)
    if kind == "ivf-pq" and count < PQ_MIN_ROWS:
        raise ConfigError(
            f"ivf-pq trains its codes on at least {PQ_MIN_ROWS:,} rows and the gallery has "
            f"{count:,}; index it with flat (exact) or ivf-sq8"
        )
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(count, min(sample, count // 10), replace=False))
    kept = np.setdiff1d(np.arange(count), held)
    order = np.concatenate([kept, held])
    rows = embeddings[order]  # the index's order: kept rows first, then the held-out ones
    kept_rows, held_rows = rows[: len(kept)], rows[len(kept) :]
    if kind == "hnsw":
        settings = IndexSettings("hnsw", m=HNSW_M, ef_search=EF_SEARCH_LADDER[-1])
        index = faiss.index_factory(dim, settings.factory, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        cells = ivf_cells(len(kept))
        codes = pq_codes(dim) if kind == "ivf-pq" else CODES[kind]
        shortlist = rerank if kind != "ivf" and rerank and rerank > 1 else None
        settings = IndexSettings(kind, nlist=cells, nprobe=cells, codes=codes, rerank=shortlist)
        index = faiss.index_factory(dim, settings.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed = IVF_TRAIN_ITERATIONS, seed
        wanted = IVF_TRAIN_PER_CELL * cells
        if kind == "ivf-pq":
            wanted = max(wanted, PQ_TRAIN)
        training = rng.choice(len(kept), min(len(kept), wanted), replace=False)
        index.train(kept_rows[np.sort(training)])
    index.add(kept_rows)
    if len(held):
        settings = _calibrate(index, settings, kept_rows, held_rows, target, k)
    index.add(held_rows)
    set_breadth(index, settings)
    return index, settings, order


def _calibrate(
    index: faiss.Index,
    settings: IndexSettings,
    kept_rows: np.ndarray,
    queries: np.ndarray,
    target: float,
    k: int,
) -> IndexSettings:
    """The first breadth of the ladder whose recall@k of the held-out `queries` against exact
    search among `kept_rows` (those in `index`, as ids ``0..len(kept_rows)-1``), less
    :data:`RECALL_MARGIN` standard errors, reaches `target`."""
    k = min(k, len(kept_rows))
    _, exact = exact_search(kept_rows, queries, k)
    if settings.kind == "hnsw":
        ladder, field = list(EF_SEARCH_LADDER), "ef_search"
    else:
        ladder = [value for value in NPROBE_LADDER if value < settings.nlist] + [settings.nlist]
        field = "nprobe"
    for value in ladder:
        tried = replace(settings, **{field: value})
        set_breadth(index, tried)
        _, found = search(index, tried, queries, k, kept_rows)
        hits = recall_per_query(found, exact)
        standard_error = float(hits.std(ddof=1) / math.sqrt(len(hits))) if len(hits) > 1 else 0.0
        tried.recall, tried.recall_k = round(float(hits.mean()), 4), k
        tried.recall_se, tried.recall_queries = round(standard_error, 4), len(hits)
        if hits.mean() - RECALL_MARGIN * standard_error >= target:
            break
    return tried


def append_rows(index: faiss.Index, rows: np.ndarray):
    """Adds `rows` (unit, float32) to `index` as the next ids."""
    index.add(np.ascontiguousarray(rows, dtype=np.float32))


def set_breadth(index: faiss.Index, settings: IndexSettings):
    """Applies the search breadth of `settings` (``nprobe`` or ``efSearch``) to `index`."""
    if settings.kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(settings.ef_search))
    elif settings.kind != "flat":
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(settings.nprobe))


def search(
    index: faiss.Index,
    settings: IndexSettings,
    queries: np.ndarray,
    k: int,
    vectors: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the `k` best rows of `index` for each query (unit rows): exact search
    for a flat index, by :func:`exact_search` over the vectors it stores; for a compressed one
    with ``settings.rerank``, the best ``rerank·k`` by its codes re-scored exactly from
    `vectors` (row ``i`` the vector of id ``i``; a memory map is read where needed only).

    Shapes:
        - **queries:** :math:`(Q, D)`, **vectors:** :math:`(N, D)`
        - **output:** :math:`(Q, k)` scores (float32) and ids (int64; ``-1`` for none)
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if isinstance(index, faiss.IndexFlat) and index.ntotal * queries.size >= EXACT_THREADED_WORK:
        return exact_search(flat_vectors(index), queries, k)
    if not settings.rerank:
        return index.search(queries, k)
    if vectors is None:
        raise ValueError(f"{settings.describe()} re-ranks from the stored vectors: pass them")
    _, shortlist = index.search(queries, k * settings.rerank)
    return rerank(vectors, queries, shortlist, k)


def flat_vectors(index: faiss.IndexFlat) -> np.ndarray:
    """The vectors a flat index stores, as a float32 array over its memory (no copy)."""
    if index.ntotal == 0:
        return np.empty((0, index.d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def rerank(
    vectors: np.ndarray, queries: np.ndarray, shortlist: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of each query's `shortlist` (ids, ``-1`` for none) by exact inner product
    with their rows of `vectors`.

    Shapes:
        - **vectors:** :math:`(N, D)`, **queries:** :math:`(Q, D)`, **shortlist:** :math:`(Q, S)`
        - **output:** :math:`(Q, k)` scores and ids, best first
    """
    found = shortlist >= 0
    rows = np.asarray(vectors[np.where(found, shortlist, 0)], dtype=np.float32)  # (Q, S, D)
    scores = np.matmul(rows, queries[:, :, None])[:, :, 0]
    scores[~found] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, best, 1), np.take_along_axis(shortlist, best, 1)
    ids[~np.isfinite(scores)] = -1
    return scores.astype(np.float32), ids


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the `k` gallery rows of highest inner product with each query.

    One matrix product per block of gallery rows (on all of torch's threads) and a running
    top-k: the gallery is streamed from memory once per call however many queries it holds.
    (faiss 1.15's ``IndexFlatIP`` compares one query at a time with one row at a time, a query
    per thread, below 128,000 queries: twice as slow for one query at 10⁶ × 512 on two cores, ten
    times for 64; see docs/retrieval.md.) A search of less than :data:`EXACT_THREADED_WORK`
    multiply-adds is left to that loop.

    Shapes:
        - **gallery:** :math:`(N, D)`, **queries:** :math:`(Q, D)`
        - **output:** :math:`(Q, k)` scores (float32) and ids (int64; ``-1`` beyond N)
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    count = len(gallery)
    if count * queries.size < EXACT_THREADED_WORK:
        index = faiss.IndexFlatIP(queries.shape[1])
        index.add(np.ascontiguousarray(gallery, dtype=np.float32))
        return index.search(queries, k)
    queries = torch.from_numpy(queries)
    block = max(4096, EXACT_BLOCK_SCORES // max(1, len(queries)))
    best_scores = torch.full((len(queries), 0), -math.inf)
    best_ids = torch.empty((len(queries), 0), dtype=torch.int64)
    for start in range(0, count, block):
        rows = np.ascontiguousarray(gallery[start : start + block], dtype=np.float32)
        scores = queries @ torch.from_numpy(rows if rows.flags.writeable else rows.copy()).T
        top, ids = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top], dim=1)
        best_ids = torch.cat([best_ids, ids + start], dim=1)
        best_scores, kept = torch.topk(best_scores, min(k, best_scores.shape[1]), dim=1)
        best_ids = torch.gather(best_ids, 1, kept)
    missing = k - best_ids.shape[1]  # padded as faiss pads
    lowest = float(np.finfo(np.float32).min)
    scores = torch.nn.functional.pad(best_scores, (0, missing), value=lowest)
    ids = torch.nn.functional.pad(best_ids, (0, missing), value=-1)
    return scores.numpy(), ids.numpy()


def recall_per_query(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query, the share of the exact top-k that `found` holds.

    Shapes:
        - **found:** :math:`(Q, k')` ids (``-1`` for none), **exact:** :math:`(Q, k)` ids
        - **output:** :math:`(Q,)`
    """
    hits = (found[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return hits.any(axis=1).sum(axis=1) / exact.shape[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of the share of the exact top-k that `found` holds.

    Shapes:
        - **found:** :math:`(Q, k')` ids (``-1`` for none), **exact:** :math:`(Q, k)` ids
    """
    return float(recall_per_query(found, exact).mean())
