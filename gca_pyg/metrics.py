"""Retrieval metrics of deep metric learning: Recall@K, MAP@R and R-precision.

Embeddings are L2-normalised and ranked by cosine similarity, exactly. The numbers are those of
pytorch-metric-learning's ``AccuracyCalculator`` (``precision_at_1`` is Recall@1,
``mean_average_precision_at_r`` is MAP@R, ``r_precision`` is RP) with these conventions:

* A query never retrieves itself: it is dropped by index, not by rank, so an identical vector of
  another sample of its class still counts as a hit.
* A query whose class has no other item in the gallery (R = 0) is left out of every metric, as
  ``AccuracyCalculator`` does by default; a warning says how many were left out.
* An item of another class that scores exactly as high as a same-class item ranks before it. Such
  ties only arise from duplicate vectors; resolving them against the query means collapsed
  embeddings score zero rather than perfectly.

How the ranking is computed
---------------------------
Call the gallery items of a query's class (itself excluded) its *positives* and the others its
*negatives*. The t-th best positive (t = 0, 1, ...) of score s ranks at
t + #{negatives scoring ≥ s}. Recall@K needs that rank for the best positive only; MAP@R and RP
only need the ranks that fall within the first R, for which the R_max best negative scores of each
query suffice. One exact sweep over all query × gallery scores therefore keeps, per query, the R_max
best negative scores (faiss's k-selection heaps) and the number of negatives scoring at least as
high as its best positive.

Rows are sorted by class and cut into class-aligned groups of about ``chunk_size`` rows, so that
every positive of a query lies in its own group's tile. Those tiles are scored first, which fixes
each query's best positive before the tiles of other groups are counted against it. When the
gallery is the query set the score matrix is symmetric, and each tile between two groups serves the
rows of both (the second through its columns): half the multiply-adds of a plain k-NN search.

After its own group's tile, a query's heap already holds the R_max best negatives of that tile
(thousands of scores at the default ``chunk_size``), so in the tiles of other groups only the few
scores above the smallest of them, or at least as high as the best positive, can change anything.
Each such tile is read once, comparing every entry with the threshold of its row and that of its
column,

.. math::
    t_q = \\min(\\text{best positive}_q, \\text{smallest kept negative}_q),

and only the entries at or above either of them reach the heaps and the counts. Nothing is
approximated: a score below the threshold of its query can neither enter that query's heap nor
count for it.

The matrix products run on torch's threads (numpy's OpenBLAS keeps its threads spinning for a
while after each product, which took a core from what follows); the element-wise passes over each
tile are cut into bands of rows that run on ``num_threads`` threads (numpy and faiss release the
GIL in them). The bands only divide the work, so the results do not depend on ``num_threads``.

Memory is O(chunk_size · (chunk_size + largest class)) for the tiles plus O(N · R_max) for the
per-query results, besides a normalised copy of the embeddings.
"""

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import faiss
import numpy as np
import torch

DEFAULT_CHUNK_SIZE = 4096
#: The length below which :func:`unit_rows` divides a row by this floor instead (that of torch's
#: ``F.normalize``): rows of zeros stay zero.
UNIT_FLOOR = 1e-12
#: The floor of :func:`retrieval_metrics`: the smallest normal float32, so that any row but a zero
#: one is ranked by its direction.
_TINY = np.finfo(np.float32).tiny


def unit_rows(x, *, in_place=False, floor=UNIT_FLOOR):
    """`x` as C-contiguous float32 rows of unit length (rows of zeros stay zero).

    A row shorter than `floor` is divided by `floor`. :func:`retrieval_metrics` passes the
    smallest normal float32, so that every row but a zero one gets unit length.

    Args:
        x (numpy.ndarray): ``(N, D)`` rows.
        in_place (bool, optional): Scale `x` itself where it is float32 and C-contiguous already
            (no copy), rather than a copy. (default: ``False``)
        floor (float, optional): The least length a row is divided by. (default:
            :data:`UNIT_FLOOR`)

    Returns:
        numpy.ndarray: ``(N, D)`` float32.
    """
    if in_place:
        x = np.ascontiguousarray(x, dtype=np.float32)
    else:
        x = np.array(x, dtype=np.float32, order="C")
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=floor)
    return x


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    *,
    query=None,
    query_labels=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    num_threads=None,
):
    """Recall@K, MAP@R and R-precision of cosine retrieval.

    By default every sample queries all the others. With ``query`` and ``query_labels`` (In-Shop),
    those query the gallery ``embeddings, labels`` and nothing is excluded.

    Args:
        embeddings (torch.Tensor or numpy.ndarray): Gallery embeddings, shape ``(N, D)``, on any
            device; they are L2-normalised here.
        labels (torch.Tensor or numpy.ndarray): Class of each gallery row, shape ``(N,)``.
        ks (sequence of int, optional): The K of each Recall@K. (default: ``(1, 2, 4, 8)``)
        query (torch.Tensor or numpy.ndarray, optional): Query embeddings, shape ``(M, D)``.
            (default: ``None``, the gallery queries itself)
        query_labels (torch.Tensor or numpy.ndarray, optional): Class of each query, shape ``(M,)``.
            (default: ``None``)
        chunk_size (int, optional): About how many rows each tile of the score matrix has; the
            tiles take about ``6 · chunk_size · (chunk_size + largest class)`` bytes, 100 MB at
            the default. (default: ``4096``)
        num_threads (int, optional): Threads for the element-wise passes over each tile; the
            results are the same for any number. (default: ``None``, that of
            :func:`torch.get_num_threads`)

    Returns:
        dict: ``{"recall@K": float for each K in ks, "map@r": float, "r_precision": float}``, each
        in ``[0, 1]`` and averaged over the queries that have at least one positive.

    Raises:
        ValueError: If shapes disagree, embeddings hold NaN or infinity, fewer than two samples
            are given, ``ks``, ``chunk_size`` or ``num_threads`` is not positive, or no query has
            a positive.
    """
    ks = _positive_ints(ks)
    if not _is_positive_int(chunk_size):
        raise ValueError(
            f"retrieval_metrics: chunk_size must be a positive integer, got {chunk_size!r}"
        )
    if num_threads is None:
        num_threads = torch.get_num_threads()
    elif not _is_positive_int(num_threads):
        raise ValueError(
            "retrieval_metrics: num_threads must be a positive integer or None (as many as "
            f"torch.get_num_threads()), got {num_threads!r}"
        )
    gallery = _as_matrix(embeddings, "embeddings")
    gallery_labels = _as_labels(labels, len(gallery), "labels", "embeddings")
    if query is None and query_labels is None:
        if len(gallery) < 2:
            raise ValueError(
                "retrieval_metrics: needs at least 2 samples to retrieve from each other, got "
                f"{len(gallery)}"
            )
        grouped = _SortedByClass.build(gallery, gallery_labels, None, None, chunk_size)
    elif query is None or query_labels is None:
        raise ValueError("retrieval_metrics: pass query and query_labels together, or neither")
    else:
        query = _as_matrix(query, "query")
        query_labels = _as_labels(query_labels, len(query), "query_labels", "query")
        if query.shape[1] != gallery.shape[1]:
            raise ValueError(
                f"retrieval_metrics: query has {query.shape[1]} dimensions but embeddings have "
                f"{gallery.shape[1]}; both must come from the same model"
            )
        grouped = _SortedByClass.build(gallery, gallery_labels, query, query_labels, chunk_size)

    n_positives = grouped.positives_per_query()
    has_positive = n_positives > 0
    if not has_positive.any():
        raise ValueError(
            "retrieval_metrics: no query has a same-class item in the gallery, so no metric is "
            "defined; check that the labels of queries and gallery use the same classes"
        )
    n_lone = grouped.n_lone_queries + int((~has_positive).sum())
    if n_lone:
        n_queries = grouped.n_lone_queries + len(n_positives)
        warnings.warn(
            f"retrieval_metrics: {n_lone} of {n_queries} queries have no same-class item in the "
            "gallery and are left out of every metric",
            stacklevel=2,
        )
    positives, top_negatives, negatives_ahead = _sweep(
        grouped, n_positives, chunk_size, num_threads
    )
    return _summarise(
        positives[has_positive],
        top_negatives[has_positive],
        negatives_ahead[has_positive],
        n_positives[has_positive],
        ks,
    )


@dataclass
class _SortedByClass:
    """Queries and gallery sorted by class, cut into class-aligned groups.

    Group ``g`` owns query rows ``query_bounds[g]:query_bounds[g + 1]`` and gallery rows
    ``gallery_bounds[g]:gallery_bounds[g + 1]``, and every class lies within one group.
    """

    query: np.ndarray  # (M, D) unit rows sorted by class; the gallery itself when self_retrieval
    gallery: np.ndarray  # (N, D) unit rows sorted by class
    query_classes: np.ndarray  # (M,) class index of each query row
    class_start: np.ndarray  # (C,) first gallery row of each class
    class_size: np.ndarray  # (C,) gallery rows of each class
    query_bounds: np.ndarray  # (G + 1,)
    gallery_bounds: np.ndarray  # (G + 1,)
    self_retrieval: bool
    n_lone_queries: int  # queries dropped because their class is absent from the gallery

    @classmethod
    def build(cls, gallery, gallery_labels, query, query_labels, chunk_size):
        """Sort and group the rows; ``query=None`` means the gallery queries itself.

        Args:
            gallery (numpy.ndarray): Gallery embeddings ``(N, D)``, not yet normalised.
            gallery_labels (numpy.ndarray): ``(N,)`` labels of any sortable dtype.
            query (numpy.ndarray or None): Query embeddings ``(M, D)``, not yet normalised.
            query_labels (numpy.ndarray or None): ``(M,)`` labels.
            chunk_size (int): Target number of gallery rows per group.

        Returns:
            _SortedByClass
        """
        classes, gallery_classes = np.unique(gallery_labels, return_inverse=True)
        gallery_order = np.argsort(gallery_classes)
        class_size = np.bincount(gallery_classes, minlength=len(classes))
        class_start = np.cumsum(class_size) - class_size
        sorted_gallery = unit_rows(gallery[gallery_order], in_place=True, floor=_TINY)
        self_retrieval = query is None
        if self_retrieval:
            sorted_query, query_classes, n_lone = sorted_gallery, gallery_classes[gallery_order], 0
        else:
            query_classes = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
            in_gallery = classes[query_classes] == query_labels
            query_order = np.flatnonzero(in_gallery)[np.argsort(query_classes[in_gallery])]
            sorted_query = unit_rows(query[query_order], in_place=True, floor=_TINY)
            query_classes = query_classes[query_order]
            n_lone = len(query_labels) - len(query_order)

        # A class joins the group in which it starts, so a group may overrun chunk_size by less
        # than one class.
        group_of_class = class_start // chunk_size
        first_classes = np.flatnonzero(np.diff(group_of_class, prepend=-1))
        query_class_size = np.bincount(query_classes, minlength=len(classes))
        query_class_start = np.cumsum(query_class_size) - query_class_size
        return cls(
            query=sorted_query,
            gallery=sorted_gallery,
            query_classes=query_classes,
            class_start=class_start,
            class_size=class_size,
            query_bounds=np.append(query_class_start[first_classes], len(sorted_query)),
            gallery_bounds=np.append(class_start[first_classes], len(sorted_gallery)),
            self_retrieval=self_retrieval,
            n_lone_queries=n_lone,
        )

    def positives_per_query(self):
        """R of each query row: its same-class gallery rows, itself excluded."""
        return self.class_size[self.query_classes] - int(self.self_retrieval)

    def tiles(self, chunk_size, *, own_group):
        """The tiles of the score matrix to compute, as ``(query rows, gallery rows)`` slices.

        Args:
            chunk_size (int): Target number of query rows per tile.
            own_group (bool): The tiles of each group with itself (which hold every positive), or
                those between groups (only one of each symmetric pair when self_retrieval).

        Returns:
            list of (slice, slice)
        """
        groups = range(len(self.gallery_bounds) - 1)
        if own_group:
            pairs = [(g, g) for g in groups]
        else:
            pairs = [
                (i, j) for i in groups for j in groups if (j > i if self.self_retrieval else j != i)
            ]
        tiles = []
        for i, j in pairs:
            first, stop = self.query_bounds[i], self.query_bounds[i + 1]
            # Cut only groups well beyond chunk_size (a class larger than it), into parts of at
            # most 1.5 × chunk_size rows.
            n_parts = max(1, round((stop - first) / chunk_size))
            cuts = np.linspace(first, stop, n_parts + 1).round().astype(int)
            columns = slice(self.gallery_bounds[j], self.gallery_bounds[j + 1])
            tiles += [(slice(a, b), columns) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        return tiles


def _sweep(grouped, n_positives, chunk_size, num_threads):
    """Score every query against the gallery, keeping what the metrics need.

    Args:
        grouped (_SortedByClass): The sorted, grouped rows.
        n_positives (numpy.ndarray): ``(M,)`` R of each query.
        chunk_size (int): Target number of query rows per tile.
        num_threads (int): Threads for the element-wise passes over each tile.

    Returns:
        tuple: ``positives`` ``(M, R_max)`` positive scores in decreasing order, padded with
        ``-inf``; ``top_negatives`` ``(M, R_max)`` the best negative scores in increasing order,
        padded with ``-FLT_MAX`` when there are fewer negatives; ``negatives_ahead`` ``(M,)`` the
        number of negatives scoring at least as high as the best positive.
    """
    n_queries, r_max = len(grouped.query), int(n_positives.max())
    heap = faiss.ResultHeap(n_queries, r_max, keep_max=True)
    smallest_kept = heap.D[:, 0]  # the top of each min-heap, a view that follows the heap
    positives = np.empty((n_queries, r_max), dtype=np.float32)
    best_positive = np.empty(n_queries, dtype=np.float32)
    negatives_ahead = np.zeros(n_queries, dtype=np.int64)
    own_tiles = grouped.tiles(chunk_size, own_group=True)
    other_tiles = grouped.tiles(chunk_size, own_group=False)
    n_elements = max((r.stop - r.start) * (c.stop - c.start) for r, c in own_tiles + other_tiles)

    def own_group_band(scores, rows, columns, at_least, band):
        # Every band of an own-group tile holds whole queries: the bands touch disjoint heaps.
        part = slice(rows.start + band.start, rows.start + band.stop)
        positives[part] = _take_positives(scores[band], grouped, part, columns, r_max)
        best_positive[part] = np.where(n_positives[part] > 0, positives[part, 0], np.inf)
        heap.add_result_subset(
            np.arange(part.start, part.stop), scores[band], np.arange(columns.start, columns.stop)
        )
        negatives_ahead[part] += np.count_nonzero(
            np.greater_equal(scores[band], best_positive[part, None], out=at_least[band]), axis=1
        )

    with _TileWorkspace(n_elements, num_threads) as workspace:
        for rows, columns in own_tiles:
            scores = workspace.scores(grouped.query[rows], grouped.gallery[columns])
            at_least = workspace.mask(scores.shape)
            band = partial(own_group_band, scores, rows, columns, at_least)
            workspace.map_bands(band, len(scores))
        for rows, columns in other_tiles:
            scores = workspace.scores(grouped.query[rows], grouped.gallery[columns])
            row_threshold = np.minimum(best_positive[rows], smallest_kept[rows])
            column_threshold = None
            if grouped.self_retrieval:
                column_threshold = np.minimum(best_positive[columns], smallest_kept[columns])
            tile_rows, tile_columns, values = workspace.candidates(
                scores, row_threshold, column_threshold
            )
            _add_scattered(heap, negatives_ahead, best_positive, rows.start + tile_rows, values)
            if grouped.self_retrieval:
                _add_scattered(
                    heap, negatives_ahead, best_positive, columns.start + tile_columns, values
                )
    return positives, np.sort(heap.D, axis=1), negatives_ahead


class _TileWorkspace:
    """Memory and threads reused by every tile of the sweep.

    Fresh arrays for each tile would page-fault as many bytes as they hold, which at SOP's size
    costs about a fifth of the whole sweep. Element-wise passes over a tile are cut into
    ``num_threads`` bands of whole rows, run on a thread pool, and their results concatenated in
    order, so that they are those of a single pass.

    Args:
        n_elements (int): Size of the largest tile.
        num_threads (int): Number of bands, and of threads.
    """

    def __init__(self, n_elements, num_threads):
        self._scores = np.empty(n_elements, dtype=np.float32)
        self._at_least = np.empty(n_elements, dtype=bool)
        self._at_least_column = np.empty(n_elements, dtype=bool)
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        if self._pool is not None:
            self._pool.shutdown()

    @staticmethod
    def _view(memory, n_rows, n_columns):
        return memory[: n_rows * n_columns].reshape(n_rows, n_columns)

    def scores(self, query, gallery):
        """``query @ gallery.T``, ``(len(query), len(gallery))``, valid until the next call."""
        out = self._view(self._scores, len(query), len(gallery))
        torch.mm(torch.from_numpy(query), torch.from_numpy(gallery).T, out=torch.from_numpy(out))
        return out

    def mask(self, shape):
        """A boolean scratch array of the tile's ``shape``, valid until the next call."""
        return self._view(self._at_least, *shape)

    def map_bands(self, function, n_rows):
        """``[function(band) for band in bands]``, the bands (slices) cutting ``range(n_rows)``
        into ``num_threads`` parts in order, run concurrently."""
        cuts = np.linspace(0, n_rows, self.num_threads + 1).round().astype(int)
        bands = [slice(start, stop) for start, stop in zip(cuts[:-1], cuts[1:]) if stop > start]
        if self._pool is None or len(bands) == 1:
            return [function(band) for band in bands]
        return list(self._pool.map(function, bands))

    def candidates(self, scores, row_threshold, column_threshold=None):
        """The entries of ``scores`` at least as high as the threshold of their row or of their
        column.

        Args:
            scores (numpy.ndarray): The tile, ``(R, C)``.
            row_threshold (numpy.ndarray): ``(R,)``.
            column_threshold (numpy.ndarray, optional): ``(C,)``; ``None`` compares rows only.

        Returns:
            tuple: The tile row, tile column and score of each such entry, in row-major order.
        """
        at_least = self.mask(scores.shape)
        at_least_column = self._view(self._at_least_column, *scores.shape)

        def band_candidates(band):
            hits = np.greater_equal(scores[band], row_threshold[band, None], out=at_least[band])
            if column_threshold is not None:
                np.logical_or(
                    hits,
                    np.greater_equal(scores[band], column_threshold, out=at_least_column[band]),
                    out=hits,
                )
            return np.flatnonzero(hits) + band.start * scores.shape[1]

        flat = np.concatenate(self.map_bands(band_candidates, len(scores)))
        tile_rows, tile_columns = np.divmod(flat, scores.shape[1])
        return tile_rows, tile_columns, scores.ravel()[flat]


def _take_positives(scores, grouped, rows, columns, r_max):
    """Read the positive scores out of a group's own tile and mask them (and self) to ``-inf``.

    Args:
        scores (numpy.ndarray): The tile, ``(len(rows), len(columns))``; modified in place.
        grouped (_SortedByClass): The sorted, grouped rows.
        rows (slice): Query rows of the tile.
        columns (slice): Gallery rows of the tile, one whole group.
        r_max (int): Largest R of any query.

    Returns:
        numpy.ndarray: ``(len(rows), r_max)`` positive scores in decreasing order, padded with
        ``-inf``.
    """
    classes = grouped.query_classes[rows]
    size = grouped.class_size[classes][:, None]
    offset = np.arange(r_max + int(grouped.self_retrieval))
    # Pad short classes by repeating their last column, then mask the repeats.
    first_column = grouped.class_start[classes][:, None] - columns.start
    tile_columns = first_column + np.minimum(offset, size - 1)
    values = np.take_along_axis(scores, tile_columns, axis=1)
    is_positive = offset < size
    if grouped.self_retrieval:
        own_column = np.arange(rows.start, rows.stop)[:, None] - columns.start
        is_positive &= tile_columns != own_column
    values[~is_positive] = -np.inf
    np.put_along_axis(scores, tile_columns, -np.inf, axis=1)
    return np.flip(np.sort(values, axis=1), axis=1)[:, :r_max]


def _add_scattered(heap, negatives_ahead, best_positive, queries, values):
    """Feed negative scores of any queries, in any order, to their heaps and counts.

    Args:
        heap (faiss.ResultHeap): Best negative scores so far of every query.
        negatives_ahead (numpy.ndarray): ``(M,)`` counts so far; updated in place.
        best_positive (numpy.ndarray): ``(M,)`` best positive score (``inf`` without positives).
        queries (numpy.ndarray): ``(P,)`` query row of each score.
        values (numpy.ndarray): ``(P,)`` the negative scores.
    """
    ahead = values >= best_positive[queries]
    negatives_ahead += np.bincount(queries[ahead], minlength=len(negatives_ahead))
    kept = values > heap.D[queries, 0]  # D[:, 0] is each min-heap's top, its smallest score
    if not kept.any():
        return
    order = np.argsort(queries[kept], kind="stable")
    queries, values = queries[kept][order], values[kept][order]
    subset, first, count = np.unique(queries, return_index=True, return_counts=True)
    # One row per query, padded with -inf, which no heap takes; the heaps' ids are not used.
    block = np.full((len(subset), count.max()), -np.inf, dtype=np.float32)
    rank_in_query = np.arange(len(queries)) - np.repeat(first, count)
    block[np.repeat(np.arange(len(subset)), count), rank_in_query] = values
    heap.add_result_subset(subset, block, np.full(block.shape[1], -1, dtype=np.int64))


def _summarise(positives, top_negatives, negatives_ahead, n_positives, ks):
    """Average the per-query metrics.

    Args:
        positives (numpy.ndarray): ``(Q, R_max)`` positive scores, decreasing, ``-inf`` padded.
        top_negatives (numpy.ndarray): ``(Q, R_max)`` best negative scores, increasing.
        negatives_ahead (numpy.ndarray): ``(Q,)`` negatives scoring at least the best positive.
        n_positives (numpy.ndarray): ``(Q,)`` R of each query, all positive.
        ks (tuple of int): The K of each Recall@K.

    Returns:
        dict: The metrics, as in :func:`retrieval_metrics`.
    """
    r_max = positives.shape[1]
    below = torch.searchsorted(torch.from_numpy(top_negatives), torch.from_numpy(positives)).numpy()
    # Of the R_max best negatives, r_max - below score at least as high as the t-th positive, so
    # it ranks at t + r_max - below (0-based) whenever that is within the first R <= R_max.
    t = np.arange(r_max)
    rank = t + (r_max - below)
    r = n_positives[:, None]
    in_first_r = (t < r) & (rank < r)
    precision_at_hit = np.where(in_first_r, (t + 1) / (rank + 1), 0.0)
    metrics = {f"recall@{k}": float(np.mean(negatives_ahead < k)) for k in ks}
    metrics["map@r"] = float(np.mean(precision_at_hit.sum(axis=1) / n_positives))
    metrics["r_precision"] = float(np.mean(in_first_r.sum(axis=1) / n_positives))
    return metrics


def _positive_ints(ks):
    """``ks`` as a tuple of positive ints, or a ValueError naming the bad value."""
    if isinstance(ks, (int, np.integer)) or not hasattr(ks, "__iter__"):
        raise ValueError(
            "retrieval_metrics: ks must be a sequence of positive integers such as (1, 2, 4, 8), "
            f"got {ks!r}"
        )
    ks = tuple(ks)
    if not ks or not all(_is_positive_int(k) for k in ks):
        raise ValueError(
            f"retrieval_metrics: ks must be positive integers such as (1, 2, 4, 8), got {ks!r}"
        )
    return tuple(int(k) for k in ks)


def _is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _as_matrix(x, name):
    """``x`` as a float32 numpy ``(N, D)`` array of finite values, or a ValueError."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(
            f"retrieval_metrics: {name} must be a non-empty 2-D (samples, dimensions) array, got "
            f"shape {x.shape}"
        )
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"retrieval_metrics: {name} has {len(bad)} rows with NaN or infinite values (first: "
            f"row {bad[0]}); the model diverged or its outputs were not computed"
        )
    return x


def _as_labels(y, n_rows, name, rows_name):
    """``y`` as a numpy ``(n_rows,)`` array, or a ValueError."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.shape != (n_rows,):
        raise ValueError(
            f"retrieval_metrics: {name} must have shape ({n_rows},), one per row of {rows_name}, "
            f"got {y.shape}"
        )
    return y
