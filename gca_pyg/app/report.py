"""``python -m gca_pyg.report RUN_DIR_OR_CHECKPOINT [--data-root DIR] [--out DIR]``

Writes a self-contained report of a training run to one folder (default ``RUN_DIR/report``):
``index.html``, which opens from disk without a server or the internet, and the images it shows —

* the run's config and its metrics (recomputed on the checkpoint, plus the last and best logged);
* training curves of every value in ``log.jsonl`` (losses, hardness, synthetic weight, learning
  rates, Recall@K / MAP@R / RP at each evaluation);
* a 2-D map of the test embeddings (PCA, then UMAP when ``umap-learn`` is installed, else t-SNE),
  coloured by class, on a seeded subsample of at most ``--max-points`` points;
* a retrieval gallery: seeded test queries with their nearest neighbours, framed green when of the
  query's class and red otherwise;
* per-class Recall@1: the worst classes, each with a thumbnail and the class it is most often
  mistaken for.

It costs one pass of the model over the test split. Needs the ``report`` extra (matplotlib and
scikit-learn): ``pip install "gca-pyg[report]"``.
"""

import argparse
import copy
import html
import importlib
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import yaml

from gca_pyg.app.html import (
    GALLERY_STYLE,
    ThumbnailFiles,
    Tile,
    gallery_row,
    img_html,
    neighbour_kind,
)
from gca_pyg.app.runs import read_log
from gca_pyg.checkpoint import RunCheckpoint, open_checkpoint
from gca_pyg.config import add_override_argument
from gca_pyg.data import RetrievalDataset
from gca_pyg.errors import ConfigError, GcaError, MissingExtraError
from gca_pyg.metrics import retrieval_metrics, unit_rows
from gca_pyg.pipeline import TestData, build_test_data, embed_test_data
from gca_pyg.vector_index import exact_search

__all__ = [
    "report_command",
    "write_report",
    "collect_report",
    "render_report",
    "ReportContent",
    "plot_curves",
    "embedding_map",
    "nearest_neighbours",
    "per_class_recall_at_1",
]

#: Queries of the retrieval gallery, and neighbours shown per query.
NUM_QUERIES, NUM_NEIGHBOURS = 16, 8
#: Classes listed under per-class Recall@1.
NUM_WORST_CLASSES = 10

#: Training curves drawn together: (title, keys of log.jsonl). Other numeric keys get a panel each.
CURVE_PANELS = (
    ("Metric losses", ("J_m", "J_syn", "J_gce", "J_metric")),
    ("Generator losses", ("J_gen", "J_ce", "J_sim", "J_div")),
    ("Classifier loss", ("J_cls",)),
    ("Synthesis schedule", ("hardness", "synthetic_weight")),
    ("Learning rates", ("lr_metric", "lr_net")),
)
TEST_PREFIX = "test/"


def report_command(run_dir: Union[str, Path]) -> str:
    """The shell command that writes the report of the run in `run_dir`."""
    return f"python -m gca_pyg.report {shlex.quote(str(run_dir))}"


def _check_rendering(max_points: int):
    """Fails early on what would stop the drawing: a missing extra or too few map points."""
    _require_extras()
    if max_points < 3:
        raise ConfigError(f"--max-points must be at least 3, got {max_points}")


def _require_extras():
    """Imports the report's optional dependencies, or says which extra installs them."""
    missing = [
        name
        for name, module in (("matplotlib", "matplotlib"), ("scikit-learn", "sklearn"))
        if not _importable(module)
    ]
    if missing:
        raise MissingExtraError(
            f"the report needs {' and '.join(missing)}, which are not installed: "
            'pip install "gca-pyg[report]"'
        )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _metric_label(name: str) -> str:
    return name.replace("recall@", "R@").replace("map@r", "MAP@R").replace("r_precision", "RP")


def plot_curves(records: Sequence[dict], out_dir: Path) -> list[tuple[str, str]]:
    """One PNG per panel of :data:`CURVE_PANELS` that has a key in `records`, one for the test
    metrics, and one for every other numeric key; absent keys are skipped.

    Returns:
        ``(title, file name)`` of each plot written to `out_dir`.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    present = {
        key
        for record in records
        for key, value in record.items()
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    test_keys = sorted(
        (key for key in present if key.startswith(TEST_PREFIX)),
        key=lambda key: (
            not key.startswith(TEST_PREFIX + "recall@"),
            int(key.rsplit("@", 1)[1]) if "recall@" in key else 0,
            key,
        ),
    )
    panels = [(title, [key for key in keys if key in present]) for title, keys in CURVE_PANELS]
    panels.append(("Test retrieval (%)", test_keys))
    grouped = {key for _, keys in panels for key in keys}
    panels += [(key, [key]) for key in sorted(present - grouped)]

    written = []
    for title, keys in panels:
        if not keys:
            continue
        figure = Figure(figsize=(4.6, 3.0), dpi=100, layout="constrained")
        axes = figure.add_subplot()
        values_seen = []
        for key in keys:
            points = [(r["epoch"], r[key]) for r in records if key in r and "epoch" in r]
            if not points:
                continue
            epochs, values = zip(*points)
            scale = 100.0 if key.startswith(TEST_PREFIX) else 1.0
            values = [scale * v for v in values]
            values_seen += values
            label = _metric_label(key[len(TEST_PREFIX) :]) if key.startswith(TEST_PREFIX) else key
            axes.plot(epochs, values, marker="o", markersize=3, label=label)
        positive = [v for v in values_seen if v > 0]
        if len(positive) == len(values_seen) and max(positive) > 100 * min(positive):
            axes.set_yscale("log")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch", fontsize=9)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if len(keys) > 1:
            axes.legend(fontsize=8)
        name = "curve-" + "".join(c if c.isalnum() else "_" for c in title.lower()) + ".png"
        figure.savefig(out_dir / name)
        written.append((title, name))
    return written


# -- the embedding map -----------------------------------------------------------------------------
def embedding_map(
    embeddings: np.ndarray, labels: np.ndarray, path: Path, *, max_points: int = 3000, seed: int = 0
) -> str:
    """Draws a 2-D map of L2-normalised `embeddings` coloured by class and saves it to `path`.

    At most `max_points` rows are drawn (a seeded subsample beyond). They are reduced to 50
    dimensions with PCA, then to 2 with UMAP when ``umap-learn`` is installed, else with t-SNE.

    Returns:
        A caption saying what was drawn and how.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    total = len(embeddings)
    if total < 3:
        raise ConfigError(f"the embedding map needs at least 3 test embeddings, got {total}")
    rng = np.random.default_rng(seed)
    rows = (
        np.sort(rng.choice(total, max_points, replace=False))
        if total > max_points
        else np.arange(total)
    )
    points = unit_rows(embeddings[rows], in_place=True)
    points = PCA(n_components=min(50, *points.shape), random_state=seed).fit_transform(points)
    if _importable("umap"):
        import umap

        method = "UMAP"
        flat = umap.UMAP(n_components=2, random_state=seed).fit_transform(points)
    else:
        from sklearn.manifold import TSNE

        method = "t-SNE"
        flat = TSNE(
            n_components=2,
            perplexity=min(30.0, (len(points) - 1) / 3),
            init="pca",
            random_state=seed,
        ).fit_transform(points)

    classes, colour_index = np.unique(labels[rows], return_inverse=True)
    if len(classes) <= 20:
        colours = colormaps["tab20"](colour_index % 20)
    else:  # neighbouring class ids get distant hues
        hues = rng.permutation(len(classes)) / len(classes)
        colours = colormaps["hsv"](hues[colour_index])
    figure = Figure(figsize=(7, 7), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(flat[:, 0], flat[:, 1], c=colours, s=6, linewidths=0)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(
        f"{method} of {len(rows):,} test embeddings, {len(classes)} classes", fontsize=10
    )
    figure.savefig(path)
    sample = (
        f"a seeded subsample of {len(rows):,} of the {total:,} test embeddings"
        if len(rows) < total
        else f"all {total:,} test embeddings"
    )
    return (
        f"{sample}, L2-normalised, reduced with PCA to {points.shape[1]} dimensions then with "
        f"{method} to 2; one colour per class ({len(classes)} classes)"
    )


# -- retrieval -------------------------------------------------------------------------------------
def nearest_neighbours(
    gallery: np.ndarray, k: int, query: Optional[np.ndarray] = None
) -> np.ndarray:
    r"""The `k` gallery rows of highest cosine similarity to every query, best first.

    Without `query`, every gallery row queries the others and never retrieves itself (dropped by
    index, as in :func:`~gca_pyg.metrics.retrieval_metrics`).

    Returns:
        Int64 array :math:`(Q, k)` of gallery row indices.
    """
    gallery = unit_rows(gallery)
    self_search = query is None
    query = gallery if self_search else unit_rows(query)
    _, found = exact_search(gallery, query, k + int(self_search))
    if not self_search:
        return found
    keep = found != np.arange(len(query))[:, None]
    # Stable sort of (kept first): each row's own index, if found, moves behind the k kept ones.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(found, order, axis=1)


@dataclass
class ClassRecall:
    """Per-class Recall@1 (:func:`per_class_recall_at_1`); arrays are indexed by class id."""

    recall: np.ndarray  # float, NaN for classes without a valid query
    queries: np.ndarray  # valid queries per class
    confused_with: np.ndarray  # class most often retrieved first instead, -1 if none
    confused_count: np.ndarray  # how often


def per_class_recall_at_1(
    query_labels: np.ndarray, first_labels: np.ndarray, valid: np.ndarray, num_classes: int
) -> ClassRecall:
    r"""Recall@1 of every class, and the class its queries most often retrieve first instead.

    .. math::
        \mathrm{R@1}_c = \frac{\#\{q : y_q = c,\ y_{\mathrm{first}(q)} = c\}}{\#\{q : y_q = c\}}

    over the `valid` queries (those with a same-class item to find).

    Args:
        query_labels: Class of each query, :math:`(Q,)`.
        first_labels: Class of each query's nearest neighbour, :math:`(Q,)`.
        valid: Bool :math:`(Q,)`, the queries that count.
        num_classes: Number of classes :math:`C` (labels are ``0..C-1``).
    """
    query_labels, first_labels = query_labels[valid], first_labels[valid]
    hit = first_labels == query_labels
    queries = np.bincount(query_labels, minlength=num_classes)
    hits = np.bincount(query_labels, weights=hit, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(queries > 0, hits / np.maximum(queries, 1), np.nan)

    confused_with = np.full(num_classes, -1, dtype=np.int64)
    confused_count = np.zeros(num_classes, dtype=np.int64)
    pairs, counts = np.unique(
        np.stack([query_labels[~hit], first_labels[~hit]], axis=1), axis=0, return_counts=True
    )
    if len(pairs):
        # Per query class, the pair of highest count (the smallest class id among ties).
        order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
        first = order[np.r_[True, np.diff(pairs[order, 0]) != 0]]
        confused_with[pairs[first, 0]] = pairs[first, 1]
        confused_count[pairs[first, 0]] = counts[first]
    return ClassRecall(recall, queries, confused_with, confused_count)


def _raw_items(dataset: RetrievalDataset) -> Callable[[int], object]:
    """Item index → the image as the dataset stores it (a PIL image or a [0, 1] tensor), without
    the model's transform."""
    raw = copy.copy(dataset)
    raw.transform = None
    return lambda index: raw[index][0]


# -- collecting ------------------------------------------------------------------------------------
@dataclass
class ReportContent:
    """What the report shows, computed from a checkpoint and its test split
    (:func:`collect_report`); :func:`render_report` draws it.

    Attributes:
        checkpoint: The checkpoint and its config.
        test_data: The test split.
        gallery, gallery_labels: The gallery's embeddings :math:`(N, D)` and labels :math:`(N,)`.
        query, query_labels: Separate queries (In-Shop), else None and the gallery's labels.
        metrics: The retrieval metrics of this checkpoint.
        neighbours: Every query's nearest gallery rows, best first, :math:`(Q, k)`.
        valid: The queries with an item of their class to find :math:`(Q,)`.
        shown: The seeded queries of the retrieval gallery.
        class_recall: Per-class Recall@1 and the class each is most mistaken for.
        records: The run's ``log.jsonl``.
    """

    checkpoint: RunCheckpoint
    test_data: TestData
    gallery: np.ndarray
    gallery_labels: np.ndarray
    query: Optional[np.ndarray]
    query_labels: np.ndarray
    metrics: dict[str, float]
    neighbours: np.ndarray
    valid: np.ndarray
    shown: np.ndarray
    class_recall: ClassRecall
    records: list[dict]


def collect_report(
    checkpoint: Union[str, Path],
    *,
    data_root: Optional[str] = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    progress: Callable[[str], None] = lambda step: None,
) -> ReportContent:
    """Embeds the test split with a checkpoint's model and computes what the report shows.

    Args:
        checkpoint: A ``.pt`` file or a run folder (its ``last.pt``).
        data_root: The dataset folder, if it moved since training.
        overrides: ``section.key=value`` config overrides, e.g. ``eval.batch_size=64``.
        seed: Seed of the choice of queries shown.
        progress: Called with the name of each step as it starts.
    """
    run = open_checkpoint(checkpoint, overrides, data_root)
    config = run.config
    test_data = build_test_data(config)
    images = len(test_data.gallery) + (0 if test_data.query is None else len(test_data.query))
    progress(f"embedding {images:,} test images")
    embedded = embed_test_data(run.build_model(), test_data, config)
    gallery = embedded["embeddings"].numpy()
    gallery_labels = embedded["labels"].numpy()
    query = embedded.get("query_embeddings")
    query = None if query is None else query.numpy()
    query_labels = gallery_labels if query is None else embedded["query_labels"].numpy()
    progress("retrieval metrics and nearest neighbours")
    metrics = retrieval_metrics(
        gallery,
        gallery_labels,
        ks=config.eval.ks,
        query=query,
        query_labels=None if query is None else query_labels,
    )
    # Queries with a same-class item to find: itself excluded when the gallery queries itself.
    num_classes = test_data.gallery.num_classes
    in_gallery = np.bincount(gallery_labels, minlength=num_classes)
    valid = in_gallery[query_labels] > (1 if query is None else 0)
    k = min(NUM_NEIGHBOURS, len(gallery) - (1 if query is None else 0))
    neighbours = nearest_neighbours(gallery, k, query)
    class_recall = per_class_recall_at_1(
        query_labels, gallery_labels[neighbours[:, 0]], valid, num_classes
    )
    candidates = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(candidates, min(NUM_QUERIES, len(candidates)), replace=False))
    return ReportContent(
        checkpoint=run,
        test_data=test_data,
        gallery=gallery,
        gallery_labels=gallery_labels,
        query=query,
        query_labels=query_labels,
        metrics=metrics,
        neighbours=neighbours,
        valid=valid,
        shown=shown,
        class_recall=class_recall,
        records=read_log(run.run_dir),
    )


# -- rendering -------------------------------------------------------------------------------------
STYLE = (
    """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #1d232a; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px;
  border-bottom: 1px solid #dde2e8; padding-bottom: 4px; }
.lead { color: #56606b; margin: 0 0 12px; }
nav a { margin-right: 14px; }
.summary { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
table.metrics { border-collapse: collapse; }
table.metrics th, table.metrics td { padding: 3px 10px; border-bottom: 1px solid #e6e9ed;
  text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
pre.config { background: #f5f7f9; padding: 8px 12px; max-height: 300px; overflow: auto; margin: 0;
  font-size: 12px; flex: 1 1 320px; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 8px; }
.curves img { width: 100%; }
figure { margin: 0; } figcaption { color: #56606b; font-size: 12px; }
img.map { width: 560px; max-width: 100%; }
.worst { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 10px; }
.worst .card { display: flex; gap: 8px; align-items: center; font-size: 12px; }
.worst .card img { width: 64px; height: 64px; object-fit: contain; background: #f0f2f4; }
.worst b { font-size: 13px; }
"""
    + GALLERY_STYLE
)


def _metrics_table(columns: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(columns.values())))
    head = "".join(f"<th>{html.escape(title)}</th>" for title in columns)
    rows = []
    for name in names:
        cells = "".join(
            f"<td>{100 * column[name]:.2f}</td>" if name in column else "<td>–</td>"
            for column in columns.values()
        )
        rows.append(f"<tr><td>{html.escape(_metric_label(name))}</td>{cells}</tr>")
    return f'<table class="metrics"><tr><th>metric (%)</th>{head}</tr>{"".join(rows)}</table>'


def _metric_columns(content: ReportContent) -> dict[str, dict[str, float]]:
    """This checkpoint's metrics beside the last and best that training logged."""
    state = content.checkpoint.state
    columns = {f"this checkpoint ({content.checkpoint.path.name})": content.metrics}
    last = dict(state.get("last_metrics") or {})
    if last:
        columns[f"last logged (epoch {last.pop('epoch', '?')})"] = last
    if state.get("best_metrics"):
        columns[f"best R@1 (epoch {state['best'].get('epoch', '?')})"] = state["best_metrics"]
    return columns


def _retrieval_rows(content: ReportContent, gallery_thumbnail, query_thumbnail) -> list[str]:
    classes = content.test_data.gallery.classes
    rows = []
    for q in content.shown.tolist():
        name = classes[content.query_labels[q]]
        src, small = query_thumbnail(q)
        query = Tile(src, small, caption=name, kind="query", label=name)
        neighbours = []
        for rank, g in enumerate(content.neighbours[q].tolist(), start=1):
            found = classes[content.gallery_labels[g]]
            src, small = gallery_thumbnail(g)
            neighbours.append(
                Tile(
                    src,
                    small,
                    caption=str(rank),
                    kind=neighbour_kind(name, found),
                    label=found,
                    title=f"rank {rank}: {found}",
                )
            )
        rows.append(gallery_row(query, neighbours))
    return rows


def _worst_class_cards(content: ReportContent, query_thumbnail) -> list[str]:
    """The classes of lowest Recall@1, each with its first valid query and the class it is most
    mistaken for."""
    recall = content.class_recall
    classes = content.test_data.gallery.classes
    ranked = [
        c
        for c in np.argsort(recall.recall, kind="stable").tolist()
        if not np.isnan(recall.recall[c])
    ][:NUM_WORST_CLASSES]
    valid_queries = np.flatnonzero(content.valid)
    first_classes, first_rows = np.unique(content.query_labels[valid_queries], return_index=True)
    first_query_of = dict(zip(first_classes.tolist(), valid_queries[first_rows].tolist()))
    cards = []
    for c in ranked:
        src, small = query_thumbnail(first_query_of[c])
        confused = ""
        if recall.confused_with[c] >= 0:
            mistaken_for = classes[recall.confused_with[c]]
            confused = (
                f"<br>mistaken most for {html.escape(mistaken_for)} ({recall.confused_count[c]}×)"
            )
        cards.append(
            f'<div class="card" data-class="{html.escape(classes[c])}">'
            f"{img_html(src, small, classes[c])}<div><b>{html.escape(classes[c])}</b><br>"
            f"R@1 {100 * recall.recall[c]:.1f}% of {recall.queries[c]} "
            f"queries{confused}</div></div>"
        )
    return cards


def render_report(
    content: ReportContent,
    out_dir: Optional[Union[str, Path]] = None,
    *,
    max_points: int = 3000,
    seed: int = 0,
    progress: Callable[[str], None] = lambda step: None,
) -> Path:
    """Draws what :func:`collect_report` computed into `out_dir` (default: ``report/`` in the run
    folder): the curves, the embedding map, the thumbnails and ``index.html``.

    Args:
        content: The report's content.
        out_dir: Where to write.
        max_points: Most points of the embedding map.
        seed: Seed of the map's subsample and layout.
        progress: Called with the name of each step as it starts.

    Returns:
        The path of ``index.html``.
    """
    _check_rendering(max_points)
    run, test_data = content.checkpoint, content.test_data
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    thumbnail_dir = out_dir / "thumbnails"
    thumbnail_dir.mkdir(parents=True, exist_ok=True)
    gallery_thumbnail = ThumbnailFiles(_raw_items(test_data.gallery), thumbnail_dir, "gallery")
    query_thumbnail = (
        gallery_thumbnail
        if test_data.query is None
        else ThumbnailFiles(_raw_items(test_data.query), thumbnail_dir, "query")
    )
    progress("training curves")
    curves = plot_curves(content.records, out_dir)
    progress(f"the embedding map (at most {max_points:,} points)")
    map_caption = embedding_map(
        content.gallery,
        content.gallery_labels,
        out_dir / "embedding-map.png",
        max_points=max_points,
        seed=seed,
    )
    progress("neighbours' thumbnails and the page")
    rows = _retrieval_rows(content, gallery_thumbnail, query_thumbnail)
    cards = _worst_class_cards(content, query_thumbnail)

    config = run.config
    after = f", {run.provenance}"
    curve_html = (
        "".join(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(title)}"></figure>'
            for title, name in curves
        )
        or "<p>No log.jsonl next to the checkpoint: no curves.</p>"
    )
    k = content.neighbours.shape[1]
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gca_pyg report: {html.escape(config.name)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>gca_pyg report: {html.escape(config.name)}</h1>
<p class="lead">{html.escape(str(run.path))}{after}; retrieval on
{html.escape(test_data.describe())}</p>
<nav><a href="#summary">metrics &amp; config</a><a href="#curves">training curves</a>
<a href="#map">embedding map</a><a href="#retrieval">retrieval</a>
<a href="#worst-classes">worst classes</a></nav>
<section id="summary"><h2>Metrics and config</h2>
<div class="summary">{_metrics_table(_metric_columns(content))}
<pre class="config">{html.escape(yaml.safe_dump(config.to_dict(), sort_keys=False))}</pre></div>
</section>
<section id="curves"><h2>Training curves</h2>
<div class="curves">{curve_html}</div>
</section>
<section id="map"><h2>Embedding map</h2>
<figure><img class="map" src="embedding-map.png" alt="2-D map of the test embeddings">
<figcaption>{html.escape(map_caption)}.</figcaption></figure>
</section>
<section id="retrieval"><h2>Retrieval: {len(content.shown)} seeded queries and their top {k}</h2>
<p class="lead">Blue: the query and its class; green: a neighbour of the same class; red: of another
class. Neighbours are numbered by rank (cosine similarity).</p>
{"".join(rows)}
</section>
<section id="worst-classes"><h2>Per-class Recall@1: the {len(cards)} worst classes</h2>
<div class="worst">{"".join(cards)}</div>
</section>
</body>
</html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def write_report(
    checkpoint: Union[str, Path],
    out_dir: Optional[Union[str, Path]] = None,
    *,
    data_root: Optional[str] = None,
    overrides: Sequence[str] = (),
    max_points: int = 3000,
    seed: int = 0,
    progress: Callable[[str], None] = lambda step: None,
) -> Path:
    """Writes the report of a checkpoint (a ``.pt`` file or a run folder, meaning its ``last.pt``):
    :func:`collect_report`, then :func:`render_report`.

    Args:
        checkpoint: The checkpoint or run folder.
        out_dir: Where to write; default ``report/`` in the run folder.
        data_root: The dataset folder, if it moved since training.
        overrides: ``section.key=value`` config overrides, e.g. ``eval.batch_size=64``.
        max_points: Most points of the embedding map.
        seed: Seed of the query choice and of the map's subsample and layout.
        progress: Called with the name of each step as it starts.

    Returns:
        The path of ``index.html``.
    """
    _check_rendering(max_points)
    content = collect_report(
        checkpoint, data_root=data_root, overrides=overrides, seed=seed, progress=progress
    )
    return render_report(content, out_dir, max_points=max_points, seed=seed, progress=progress)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.report",
        description="Write an HTML report of a training run: metrics, curves, an embedding map, "
        "retrieved neighbours and the worst classes.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run folder (its last.pt) or a .pt file (last.pt, best.pt)",
    )
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder, if it moved")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/report)")
    parser.add_argument(
        "--max-points",
        type=int,
        default=3000,
        metavar="N",
        help="most points of the embedding map (default: 3000)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the queries and of the map (default: 0)"
    )
    add_override_argument(
        parser, "override a config key, e.g. train.device=cpu or eval.batch_size=64"
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def progress(step: str):
        print(f"report: {step} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    try:
        index = write_report(
            args.checkpoint,
            args.out,
            data_root=args.data_root,
            overrides=args.overrides,
            max_points=args.max_points,
            seed=args.seed,
            progress=progress,
        )
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {index} (open it in a browser: {index.resolve().as_uri()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
