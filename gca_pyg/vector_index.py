r"""Nearest-neighbour search over L2-normalised embeddings with faiss: exact or approximate.

All indexes rank by inner product, which for unit vectors is the cosine similarity:

* ``flat`` — exact search (``IndexFlatIP``): every query is compared with every gallery row;
* ``ivf`` — an inverted file (``IndexIVFFlat``): k-means splits the gallery into ``nlist`` cells
  and a query scans the ``nprobe`` cells whose centroids are nearest;
* ``hnsw`` — a hierarchical navigable small-world graph (``IndexHNSWFlat``, ``M`` links per
  node): a query walks the graph, keeping the ``efSearch`` best candidates.

The approximate kinds trade recall for speed through their search breadth (``nprobe``,
``efSearch``). :func:`build_index` sets it to the smallest value whose recall@k against exact
search reaches a target,

.. math::
    \mathrm{recall@}k = \frac{1}{|Q|} \sum_{q \in Q}
    \frac{|\mathrm{approx}_k(q) \cap \mathrm{exact}_k(q)|}{k},

where the queries :math:`Q` are a seeded sample of gallery rows held out of the index while it is
measured (then added, last: the index holds the rows in the order :func:`build_index` returns):
they are new images to it, as real queries are. (A row already in an HNSW
graph is linked to its neighbours, and would overstate the recall of new images.) ``auto`` picks
exact search up to :data:`EXACT_LIMIT` rows and IVF beyond, the choice that
``benchmarks/bench_index.py`` measures.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import faiss
import numpy as np

from gca_pyg.errors import ConfigError

__all__ = [
    "INDEX_KINDS",
    "EXACT_LIMIT",
    "TARGET_RECALL",
    "IndexSettings",
    "choose_kind",
    "build_index",
    "append_rows",
    "set_breadth",
    "unit_rows",
    "exact_search",
    "recall_at_k",
]

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
#: Largest gallery that ``auto`` searches exactly. Exact search costs N·D multiply-adds a query,
#: about 10 ms for 50,000 rows of 512 on one free CPU core (2.4 ms measured at 10,000), growing
#: linearly with N; beyond it,
#: ``auto`` builds IVF, which in ``benchmarks/bench_index.py`` built 5x faster than HNSW and
#: answered single queries as fast or faster at the same recall.
EXACT_LIMIT = 50_000
#: The recall@10 against exact search that :func:`build_index` aims at by default.
TARGET_RECALL = 0.95
#: Links per node of an HNSW graph, and the candidates kept while inserting.
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80
#: Training rows per IVF cell (faiss warns below 39) and k-means iterations.
IVF_TRAIN_PER_CELL, IVF_TRAIN_ITERATIONS = 40, 10
#: Search breadths that :func:`build_index` tries, in order.
NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class IndexSettings:
    """How an index was built and is searched, as stored in an index folder's manifest.

    Attributes:
        kind: ``flat``, ``ivf`` or ``hnsw``.
        nlist: IVF cells.
        nprobe: IVF cells scanned per query.
        m: HNSW links per node.
        ef_search: HNSW candidates kept per query.
        recall: Recall@k against exact search on held-out rows (1 for ``flat``).
        recall_k: The k of `recall`.
    """

    kind: str = "flat"
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    m: Optional[int] = None
    ef_search: Optional[int] = None
    recall: Optional[float] = None
    recall_k: Optional[int] = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "IndexSettings":
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def describe(self) -> str:
        if self.kind == "ivf":
            return f"IVF ({self.nlist} cells, nprobe {self.nprobe})"
        if self.kind == "hnsw":
            return f"HNSW (M {self.m}, efSearch {self.ef_search})"
        return "exact (flat inner product)"


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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` as contiguous float32 rows of unit length (rows of zeros stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    target: float = TARGET_RECALL,
    k: int = 10,
    sample: int = 1000,
    seed: int = 0,
) -> tuple[faiss.Index, IndexSettings, np.ndarray]:
    """An index of `embeddings` (unit rows) of `kind` (``auto`` resolved by :func:`choose_kind`).
    An approximate kind gets the smallest search breadth on its ladder whose recall@`k` against
    exact search reaches `target` on `sample` seeded rows held out of the index while they are
    measured (at most a tenth of the rows); if none does, the widest.

    Shapes:
        - **embeddings:** :math:`(N, D)`

    Returns:
        The index, its settings (with the measured recall), and the order of the rows in it: id
        ``i`` of the index is row ``order[i]`` (the held-out rows last; ``arange(N)`` for exact
        search).
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = embeddings.shape
    kind = choose_kind(kind, count)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(embeddings)
        return index, IndexSettings("flat", recall=1.0), np.arange(count)
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(count, min(sample, count // 10), replace=False))
    kept = np.setdiff1d(np.arange(count), held)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        settings = IndexSettings("hnsw", m=HNSW_M, ef_search=EF_SEARCH_LADDER[-1])
    else:
        cells = ivf_cells(len(kept))
        index = faiss.index_factory(dim, f"IVF{cells},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed = IVF_TRAIN_ITERATIONS, seed
        training = min(len(kept), IVF_TRAIN_PER_CELL * cells)
        index.train(embeddings[np.sort(rng.choice(kept, training, replace=False))])
        settings = IndexSettings("ivf", nlist=cells, nprobe=cells)
    index.add(embeddings[kept])
    if len(held):
        settings = _calibrate(index, settings, embeddings, kept, held, target, k)
    index.add(embeddings[held])
    set_breadth(index, settings)
    return index, settings, np.concatenate([kept, held])


def _calibrate(
    index: faiss.Index,
    settings: IndexSettings,
    embeddings: np.ndarray,
    kept: np.ndarray,
    held: np.ndarray,
    target: float,
    k: int,
) -> IndexSettings:
    """The first breadth of the ladder whose recall@k of the `held` rows against exact search
    among the `kept` rows (those in `index`, as ids ``0..len(kept)-1``) reaches `target`."""
    queries = embeddings[held]
    k = min(k, len(kept))
    _, exact = exact_search(embeddings[kept], queries, k)
    if settings.kind == "ivf":
        ladder = [value for value in NPROBE_LADDER if value < settings.nlist] + [settings.nlist]
        field = "nprobe"
    else:
        ladder, field = list(EF_SEARCH_LADDER), "ef_search"
    for value in ladder:
        tried = IndexSettings(**{**asdict(settings), field: value})
        set_breadth(index, tried)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, exact)
        tried.recall, tried.recall_k = round(recall, 4), k
        if recall >= target:
            break
    return tried


def append_rows(index: faiss.Index, rows: np.ndarray):
    """Adds `rows` (unit, float32) to `index` as the next ids."""
    index.add(np.ascontiguousarray(rows, dtype=np.float32))


def set_breadth(index: faiss.Index, settings: IndexSettings):
    """Applies the search breadth of `settings` (``nprobe`` or ``efSearch``) to `index`."""
    if settings.kind == "ivf":
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(settings.nprobe))
    elif settings.kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(settings.ef_search))


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the `k` gallery rows of highest inner product with each query.

    Shapes:
        - **gallery:** :math:`(N, D)`, **queries:** :math:`(Q, D)`
        - **output:** :math:`(Q, k)` scores (float32) and ids (int64)
    """
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of the share of the exact top-k that `found` holds.

    Shapes:
        - **found:** :math:`(Q, k')` ids (``-1`` for none), **exact:** :math:`(Q, k)` ids
    """
    hits = (found[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(hits.any(axis=1).sum(axis=1).mean() / exact.shape[1])
