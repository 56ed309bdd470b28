"""Image retrieval with a trained model: embed a gallery, index it, search it, save and load it.

:class:`Retriever` is what a Python user deploys::

    retriever = Retriever.from_checkpoint("runs/cub-20261123-101500/best.pt")
    retriever.add(["shop/a.jpg", "shop/b.jpg"], labels=["boots", "sandals"])
    retriever.save("shop-index")
    results = Retriever.load("shop-index").search(["photo.jpg"], k=5)
    results[0].paths, results[0].scores, results[0].labels

An index folder holds plain files that any program can read:

* ``index.json`` — what the folder holds: the number of items, the embedding size, the index kind
  and its settings, the checkpoint it was embedded with (path, epoch, fingerprint), where the
  images came from;
* ``items.csv`` — one row per item: ``id`` (the row of the embeddings and the faiss id), ``path``
  and ``label`` (empty where unknown);
* ``embeddings.npy`` — float32 :math:`(N, D)`, L2-normalised (``numpy.load``);
* ``index.faiss`` — the faiss index over them (``faiss.read_index``);
* ``model.pt`` — the checkpoint's config and weights (without the optimiser state), so that queries
  are embedded by the model that embedded the gallery, wherever the folder is copied. A gallery
  indexed from embeddings without a checkpoint has none (its manifest's ``checkpoint`` is null):
  its queries are vectors.

A save writes a complete new version into ``.next/`` and then moves its files into place,
``index.json`` last; an interrupted move is finished by the next :meth:`Retriever.load` or index
run, so a folder never mixes two versions.
"""

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, Optional, Union
from zipfile import BadZipFile

import faiss
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gca_pyg import __version__
from gca_pyg.checkpoint import RunCheckpoint, open_checkpoint, save_checkpoint
from gca_pyg.data import DECODE_ERRORS, get_dataset, open_rgb
from gca_pyg.errors import ConfigError, GcaError
from gca_pyg.pipeline import inference_transform, loader_options, preprocessing
from gca_pyg.runtime import autocast_dtype, resolve_device
from gca_pyg.vector_index import (
    RERANK_FACTOR,
    TARGET_RECALL,
    IndexSettings,
    append_rows,
    build_index,
    check_vectors,
    search,
    set_breadth,
    unit_rows,
)

__all__ = [
    "Retriever",
    "Embedder",
    "SearchResult",
    "IndexFolderError",
    "ImageSource",
    "INDEX_FORMAT",
    "read_manifest",
    "read_items",
    "fingerprint_of",
    "read_vectors",
    "recover",
]

#: Bumped when the layout of an index folder changes incompatibly.
INDEX_FORMAT = 1
MANIFEST, ITEMS, EMBEDDINGS, FAISS_FILE, MODEL_FILE = (
    "index.json",
    "items.csv",
    "embeddings.npy",
    "index.faiss",
    "model.pt",
)
#: The folder a save is written into before its files move into place.
NEXT = ".next"
#: Where an indexing run keeps what it has embedded until it is saved (see gca_pyg.index).
PARTIAL = ".partial"

#: An image to embed: a file path, a ``PIL.Image``, or an image tensor ``(3, H, W)``.
ImageSource = Union[str, os.PathLike, Image.Image, torch.Tensor]


class IndexFolderError(GcaError, OSError):
    """An index folder is missing, of another format, or its files disagree."""


# -- embedding -------------------------------------------------------------------------------------
class _Images(Dataset):
    """Images to embed, transformed; an unreadable file gives a blank image flagged ``False``."""

    def __init__(self, items: Sequence[Any], transform, blank: torch.Tensor):
        self.items, self.transform, self.blank = items, transform, blank

    def __len__(self) -> int:
        return len(self.items)

    def load(self, item) -> Any:
        if isinstance(item, (str, os.PathLike)):
            return open_rgb(item)
        return item

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            image = self.load(self.items[index])
        except DECODE_ERRORS:
            return self.blank, False
        return torch.as_tensor(self.transform(image)), True


class _DatasetItems(_Images):
    """Items of a :class:`~gca_pyg.data.RetrievalDataset` (its images as stored) by index."""

    def __init__(self, dataset, indices: Sequence[int], transform, blank: torch.Tensor):
        super().__init__(indices, transform, blank)
        self.dataset = dataset

    def load(self, item) -> Any:
        return self.dataset[item][0]


class Embedder:
    """A checkpoint's model as a function from images to unit-length embeddings: the test transform,
    batches on the config's device in its precision (bf16 autocast where native), L2 norm.

    Args:
        checkpoint: The checkpoint (:func:`~gca_pyg.checkpoint.open_checkpoint`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (default: the config's ``train.device``).
        batch_size: Images per batch (default: the config's ``eval.batch_size``).
        num_workers: Decoding processes (default: the config's ``data.num_workers``).
    """

    def __init__(
        self,
        checkpoint: RunCheckpoint,
        *,
        device: Optional[str] = None,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
    ):
        config = checkpoint.config
        self.checkpoint = checkpoint
        self.device = resolve_device(device or config.train.device)
        self.model = checkpoint.build_model(self.device)
        self.transform = inference_transform(config)
        self.batch_size = batch_size or config.eval.batch_size
        self.num_workers = config.data.num_workers if num_workers is None else num_workers
        self.dim = config.model.embedding_size
        self.fingerprint = checkpoint.embedder_fingerprint()
        amp = autocast_dtype(config.train.precision, self.device)
        self.precision = "fp32" if amp is None else "bf16"
        size = config.data.image_size
        self.blank = torch.as_tensor(self.transform(Image.new("RGB", (size, size))))

    def batches(self, count: int) -> list[list[int]]:
        """Positions ``0..count-1`` in batches of :attr:`batch_size`."""
        return [
            list(range(start, min(start + self.batch_size, count)))
            for start in range(0, count, self.batch_size)
        ]

    def embed_batches(
        self, images: Dataset, batches: Sequence[Sequence[int]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embeds the `batches` (lists of positions) of an image dataset, in order, with one set
        of decoding processes.

        Yields:
            Per batch, float32 unit embeddings (zero rows where unreadable) and the readable mask.
        """
        options = loader_options(self.checkpoint.config, self.device, self.num_workers)
        for batch, ok in DataLoader(images, batch_sampler=batches, **options):
            z = self.model.embed(batch, unit=True)
            yield torch.where(ok[:, None], z.cpu(), 0.0).numpy(), ok.numpy()

    def embed_dataset(
        self, images: Dataset, progress: Optional[tqdm] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (float32, unit rows; zeros where unreadable) and the readable mask of an
        image dataset, in order."""
        embeddings, readable = [np.empty((0, self.dim), np.float32)], [np.empty(0, bool)]
        for z, ok in self.embed_batches(images, self.batches(len(images))):
            embeddings.append(z)
            readable.append(ok)
            if progress is not None:
                progress.update(len(ok))
        return np.concatenate(embeddings), np.concatenate(readable)

    def embed(
        self, images: Sequence[ImageSource], progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds `images` (file paths, ``PIL.Image`` or image tensors).

        Returns:
            Float32 unit embeddings :math:`(n, D)` (zero rows for unreadable files) and a bool
            mask :math:`(n,)` of the readable ones.
        """
        bar = tqdm(
            total=len(images), desc="embedding", unit="img", disable=not progress, file=sys.stderr
        )
        with bar:
            return self.embed_dataset(self.images(images), bar)

    def images(self, items: Sequence[ImageSource]) -> _Images:
        return _Images(list(items), self.transform, self.blank)

    def dataset_items(self, dataset, indices: Sequence[int]) -> _Images:
        """Items `indices` of a dataset, with this model's transform instead of the dataset's."""
        raw = _raw_dataset(dataset)
        return _DatasetItems(raw, list(indices), self.transform, self.blank)


def _raw_dataset(dataset):
    """`dataset` returning its images as stored (without its own transform)."""
    import copy

    raw = copy.copy(dataset)
    raw.transform = None
    return raw


# -- results ---------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The nearest gallery items of one query, best first.

    Attributes:
        query: The query's path, or a name for an image passed in memory.
        ids: Gallery ids (rows of ``embeddings.npy`` and ``items.csv``) :math:`(k,)`.
        scores: Cosine similarities :math:`(k,)`.
        paths: The gallery items' paths.
        labels: Their labels (None where unknown).
    """

    query: str
    ids: np.ndarray
    scores: np.ndarray
    paths: list[str]
    labels: list[Optional[str]]

    def neighbors(self) -> list[dict[str, Any]]:
        """``[{"rank": 1, "id": ..., "path": ..., "score": ..., "label": ...}, ...]``."""
        return [
            {
                "rank": rank,
                "id": int(i),
                "path": path,
                "score": round(float(score), 6),
                "label": lab,
            }
            for rank, (i, path, score, lab) in enumerate(
                zip(self.ids, self.paths, self.scores, self.labels), start=1
            )
        ]

    def to_dict(self) -> dict[str, Any]:
        """``{"query": PATH, "neighbors": [...]}``, a line of ``gca_pyg.search --json``."""
        return {"query": self.query, "neighbors": self.neighbors()}


# -- the index folder ------------------------------------------------------------------------------
def read_manifest(index_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The ``index.json`` of `index_dir` (after finishing an interrupted save), or None if the
    folder holds no index.

    Raises:
        IndexFolderError: If the manifest is unreadable or of another format.
    """
    index_dir = Path(index_dir)
    recover(index_dir)
    path = index_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise IndexFolderError(
            f"{path} is not readable ({error}); rebuild the index with python -m gca_pyg.index"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexFolderError(
            f"{path} is not a gca_pyg index of format {INDEX_FORMAT}; rebuild the index with "
            "python -m gca_pyg.index"
        )
    return manifest


def recover(index_dir: Path):
    """Finishes a save that was interrupted while its files moved into place (its ``.next/`` holds
    a manifest), or discards one interrupted while it was written (no manifest yet)."""
    next_dir = Path(index_dir) / NEXT
    if not next_dir.is_dir():
        return
    if (next_dir / MANIFEST).is_file():
        _commit(Path(index_dir))
    else:
        shutil.rmtree(next_dir)


def _commit(index_dir: Path):
    """Moves the files of ``.next/`` into `index_dir`, the manifest last, then forgets what an
    indexing run kept for resuming (it is in the index now)."""
    next_dir = index_dir / NEXT
    for path in sorted(next_dir.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, index_dir / path.name)
    shutil.rmtree(index_dir / PARTIAL, ignore_errors=True)
    next_dir.rmdir()


def _write_items(path: Path, paths: Sequence[str], labels: Sequence[Optional[str]]):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "label"])
        for row, (item, label) in enumerate(zip(paths, labels)):
            writer.writerow([row, item, "" if label is None else label])


def read_items(path: Path) -> tuple[list[str], list[Optional[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["path"] for row in rows], [row["label"] or None for row in rows]


#: The files vectors are read from: numpy's, and ``python -m gca_pyg.evaluate --export``'s.
VECTOR_FILES = (".npy", ".npz", ".pt")


def read_vectors(path: Union[str, Path], option: str) -> tuple[np.ndarray, Optional[list]]:
    """The float32 rows :math:`(N, D)` of a ``.npy`` file, or of the ``embeddings`` array of a
    ``.npz`` or ``.pt`` file (what ``evaluate --export`` writes), with its ``labels`` where it
    holds them (else None).

    Raises:
        ConfigError: One line, naming `option` and the file: missing, unreadable, not an array
            of finite non-zero float rows.
    """
    path = Path(path).expanduser()
    where = f"{option} {path}"
    if path.suffix not in VECTOR_FILES:
        raise ConfigError(f"{where}: use a {', '.join(VECTOR_FILES)} file of one row per item")
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    labels = None
    try:
        if path.suffix == ".npy":
            vectors = np.load(path, mmap_mode="r")
        else:
            if path.suffix == ".npz":
                with np.load(path) as arrays:
                    stored = {name: arrays[name] for name in arrays.files}
            else:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(stored, dict) or "embeddings" not in stored:
                raise ConfigError(
                    f"{where} holds no array named embeddings (it holds "
                    f"{', '.join(stored) if isinstance(stored, dict) else type(stored).__name__})"
                    "; save the rows as embeddings, or as a .npy file"
                )
            vectors = np.asarray(stored["embeddings"])
            if "labels" in stored:
                labels = np.asarray(stored["labels"]).tolist()
    except ConfigError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, BadZipFile, UnpicklingError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where} is not a readable {path.suffix} file ({reason})") from None
    return check_vectors(vectors, where), labels


def fingerprint_of(manifest: dict[str, Any]) -> Optional[str]:
    """The fingerprint of the model that embedded an index folder (None: indexed from embeddings
    without a checkpoint)."""
    checkpoint = manifest.get("checkpoint")
    return None if checkpoint is None else checkpoint["fingerprint"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the retriever ---------------------------------------------------------------------------------
@dataclass
class _Gallery:
    """The rows of a retriever: unit embeddings with their paths and labels."""

    embeddings: np.ndarray
    paths: list[str] = field(default_factory=list)
    labels: list[Optional[str]] = field(default_factory=list)


class Retriever:
    """A searchable gallery of images embedded by a trained GCA-HNG model.

    Build one with :meth:`from_checkpoint` and :meth:`add`, or open an index folder written by
    :meth:`save` or ``python -m gca_pyg.index`` with :meth:`load`; then :meth:`search`. A gallery
    embedded elsewhere needs no model: ``Retriever(dim=D)``, :meth:`add_embeddings`, and queries
    as vectors (:meth:`search_embeddings`).

    Args:
        embedder: The model that embeds gallery and queries (None: embeddings only).
        dim: The embedding size, where there is no `embedder`.
        index: ``auto`` (exact search up to 50,000 items, IVF beyond), ``flat`` (exact), ``ivf``,
            ``hnsw``, or the compressed ``ivf-sq8`` and ``ivf-pq`` (see
            :mod:`gca_pyg.vector_index`); approximate kinds are calibrated to recall@10 ≥ 0.95
            against exact search when built.
        source: Where the gallery came from (recorded in the manifest).
        target_recall: The recall@10 an approximate index is calibrated to.
        rerank: The shortlist of a compressed index re-scored exactly from the stored vectors, in
            multiples of k (1: none).
    """

    def __init__(
        self,
        embedder: Optional[Embedder] = None,
        *,
        dim: Optional[int] = None,
        index: str = "auto",
        source: Optional[dict] = None,
        target_recall: float = TARGET_RECALL,
        rerank: int = RERANK_FACTOR,
    ):
        if embedder is None and dim is None:
            raise ConfigError("a Retriever needs an embedder, or the dim of its embeddings")
        self.embedder = embedder
        self.dim = embedder.dim if embedder is not None else int(dim)
        self.index_kind = index
        self.source = source or {}
        self.target_recall = target_recall
        self.rerank = rerank
        self.gallery = _Gallery(np.empty((0, self.dim), np.float32))
        self.settings: Optional[IndexSettings] = None
        self._index: Optional[faiss.Index] = None
        self._datasets: dict[str, Any] = {}  # a dataset source's splits, for image()
        self._positions: Optional[dict[str, int]] = None  # path -> id, for find()
        self.created = _now()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, Path, RunCheckpoint],
        *,
        index: str = "auto",
        device: Optional[str] = None,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = 0,
        overrides: Sequence[str] = (),
    ) -> "Retriever":
        """An empty retriever embedding with the model of `checkpoint` (a ``.pt`` file or a run
        folder)."""
        if not isinstance(checkpoint, RunCheckpoint):
            checkpoint = open_checkpoint(checkpoint, overrides)
        embedder = Embedder(
            checkpoint, device=device, batch_size=batch_size, num_workers=num_workers
        )
        return cls(embedder, index=index)

    @classmethod
    def load(
        cls,
        index_dir: Union[str, Path],
        *,
        device: Optional[str] = None,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = 0,
        embedder: Optional[Embedder] = None,
    ) -> "Retriever":
        """Opens an index folder, with the model it was embedded with (``model.pt``), or with
        `embedder` when given (a model of the same fingerprint, already loaded). A folder indexed
        from embeddings without a checkpoint has no model: it is searched with vectors.

        Raises:
            IndexFolderError: If the folder holds no index, or its files disagree.
        """
        index_dir = Path(index_dir)
        if not index_dir.is_dir():
            state = "is not a folder" if index_dir.exists() else "does not exist"
            raise IndexFolderError(
                f"{index_dir} {state}; give the --out folder of python -m gca_pyg.index"
            )
        manifest = read_manifest(index_dir)
        if manifest is None:
            hint = (
                "an unfinished indexing run: run the same index command again to finish it"
                if (index_dir / PARTIAL).is_dir()
                else "build one with python -m gca_pyg.index CHECKPOINT --images DIR --out "
                f"{index_dir}"
            )
            raise IndexFolderError(f"{index_dir} holds no index ({MANIFEST}); {hint}")
        if manifest["checkpoint"] is None:
            embedder = None
        elif embedder is None:
            embedder = Embedder(
                open_checkpoint(index_dir / MODEL_FILE),
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
            )
        retriever = cls(embedder, dim=manifest["dim"], index=manifest["index"]["kind"])
        retriever.source, retriever.created = manifest.get("source", {}), manifest.get("created")
        paths, labels = read_items(index_dir / ITEMS)
        embeddings = np.load(index_dir / EMBEDDINGS, mmap_mode="r")
        index = faiss.read_index(str(index_dir / FAISS_FILE))
        counts = {
            MANIFEST: manifest["count"],
            ITEMS: len(paths),
            EMBEDDINGS: len(embeddings),
            FAISS_FILE: index.ntotal,
        }
        if len(set(counts.values())) > 1 or embeddings.shape[1:] != (retriever.dim,):
            found = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise IndexFolderError(
                f"the files of {index_dir} disagree ({found} items; embeddings "
                f"{embeddings.shape}); rebuild it with python -m gca_pyg.index"
            )
        if embedder is not None and fingerprint_of(manifest) != embedder.fingerprint:
            raise IndexFolderError(
                f"the model given is not the one that embedded {index_dir} "
                f"({manifest['checkpoint']['path']}); search it with that model"
            )
        retriever.gallery = _Gallery(embeddings, paths, labels)
        retriever.settings = IndexSettings.from_dict(manifest["index"])
        retriever.rerank = retriever.settings.rerank or 1
        set_breadth(index, retriever.settings)
        retriever._index = index
        return retriever

    # -- the gallery -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gallery.paths)

    @property
    def paths(self) -> list[str]:
        return self.gallery.paths

    @property
    def labels(self) -> list[Optional[str]]:
        return self.gallery.labels

    @property
    def embeddings(self) -> np.ndarray:
        """The gallery's unit embeddings :math:`(N, D)`, row ``i`` of item ``i``."""
        return self.gallery.embeddings

    def add(
        self,
        images: Sequence[ImageSource],
        labels: Optional[Sequence[Optional[str]]] = None,
        *,
        names: Optional[Sequence[str]] = None,
        progress: bool = False,
    ) -> list[str]:
        """Embeds `images` and adds the readable ones to the gallery.

        Args:
            images: File paths, ``PIL.Image`` or image tensors ``(3, H, W)``.
            labels: A label per image (None where unknown).
            names: What to record as each item's path (default: its path, or ``image-{id}``).
            progress: Show a progress bar.

        Returns:
            The names of the images that could not be read (skipped).
        """
        images = list(images)
        names = _names(images, names, start=len(self))
        labels = [None] * len(images) if labels is None else list(labels)
        if len(labels) != len(images):
            raise ConfigError(f"add got {len(images)} images but {len(labels)} labels")
        embeddings, readable = self.model().embed(images, progress=progress)
        keep = np.flatnonzero(readable).tolist()
        self.add_embeddings(
            embeddings[readable], [names[i] for i in keep], [labels[i] for i in keep]
        )
        return [name for name, ok in zip(names, readable) if not ok]

    def add_embeddings(
        self, embeddings: np.ndarray, paths: Sequence[str], labels: Sequence[Optional[str]]
    ):
        """Adds rows embedded elsewhere (by this retriever's model), normalising them.

        Raises:
            ConfigError: If the rows are not of this gallery's size, or not finite, or zero.
        """
        embeddings = check_vectors(embeddings, "the embeddings added", self.dim)
        if len(embeddings) != len(paths) or len(paths) != len(labels):
            raise ConfigError(
                f"add_embeddings got {len(embeddings)} embeddings, {len(paths)} paths and "
                f"{len(labels)} labels"
            )
        if len(embeddings) == 0:
            return
        self._positions = None
        rows = unit_rows(embeddings)
        self.gallery = _Gallery(
            np.concatenate([np.asarray(self.gallery.embeddings), rows]) if len(self) else rows,
            self.gallery.paths + [str(p) for p in paths],
            self.gallery.labels + list(labels),
        )

    def _take(self, order: np.ndarray):
        """Reorders the gallery: row ``i`` becomes row ``order[i]`` (the order of the index)."""
        if np.array_equal(order, np.arange(len(order))):
            return
        rows = order.tolist()
        self._positions = None
        self.gallery = _Gallery(
            np.asarray(self.gallery.embeddings)[order],
            [self.gallery.paths[i] for i in rows],
            [self.gallery.labels[i] for i in rows],
        )

    def find(self, path: str) -> Optional[int]:
        """The id of the gallery item recorded as `path`, or None."""
        if self._positions is None:
            self._positions = {item: i for i, item in enumerate(self.gallery.paths)}
        return self._positions.get(str(path))

    def image(self, item: int) -> Optional[Any]:
        """Gallery item `item`'s image as stored (for thumbnails), or None if it is not available
        (a file that moved, an image added from memory)."""
        path = self.gallery.paths[item]
        if os.path.isfile(path):
            try:
                return open_rgb(path)
            except DECODE_ERRORS:
                return None
        dataset = self.source.get("dataset")
        if dataset and self.source.get("files") is False and path.startswith(f"{dataset}:"):
            split, number = path.split(":", 1)[1].rsplit("/", 1)
            if split not in self._datasets:
                self._datasets[split] = _raw_dataset(
                    get_dataset(dataset, self.source.get("root"), split)
                )
            return self._datasets[split][int(number)][0]
        return None

    # -- searching ---------------------------------------------------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The faiss index of the gallery, built (and calibrated) on first use and extended with
        rows added since."""
        count = len(self)
        if count == 0:
            raise ConfigError("the gallery is empty: add images before searching or saving")
        if self._index is None:
            self._index, self.settings, order = build_index(
                self.gallery.embeddings,
                self.index_kind,
                target=self.target_recall,
                rerank=self.rerank,
            )
            self._take(order)
        elif self._index.ntotal < count:
            append_rows(self._index, self.gallery.embeddings[self._index.ntotal :])
        return self._index

    def search(
        self,
        queries: Sequence[ImageSource],
        k: int = 10,
        *,
        names: Optional[Sequence[str]] = None,
    ) -> list[SearchResult]:
        """The `k` nearest gallery items of every readable query, best first.

        Raises:
            ConfigError: If no query can be read.
        """
        queries = list(queries)
        names = _names(queries, names, start=0, prefix="query")
        embeddings, readable = self.model().embed(queries)
        if not readable.any():
            raise ConfigError(f"none of the {len(queries)} query images could be read")
        return self.search_embeddings(
            embeddings[readable], k, [n for n, ok in zip(names, readable) if ok]
        )

    def search_embeddings(
        self, embeddings: np.ndarray, k: int, names: Sequence[str]
    ) -> list[SearchResult]:
        """:meth:`search` for query embeddings computed already.

        Raises:
            ConfigError: If the queries are not of this gallery's size, or not finite, or zero.
        """
        queries = unit_rows(check_vectors(embeddings, "the query vectors", self.dim))
        index = self.index
        k = min(k, len(self))
        scores, ids = search(index, self.settings, queries, k, self.embeddings)
        results = []
        for name, row_scores, row_ids in zip(names, scores, ids):
            found = row_ids >= 0  # an approximate index may return fewer than k
            row_ids, row_scores = row_ids[found], row_scores[found]
            results.append(
                SearchResult(
                    str(name),
                    row_ids,
                    row_scores,
                    [self.gallery.paths[i] for i in row_ids.tolist()],
                    [self.gallery.labels[i] for i in row_ids.tolist()],
                )
            )
        return results

    def model(self) -> Embedder:
        """The model that embeds this gallery's images.

        Raises:
            ConfigError: If the gallery was indexed from embeddings without one.
        """
        if self.embedder is None:
            raise ConfigError(
                "this gallery was indexed from embeddings without a checkpoint, so it has no "
                "model to embed images: search it with vectors (python -m gca_pyg.search "
                "INDEX_DIR --vectors Q.npy, or Retriever.search_embeddings)"
            )
        return self.embedder

    # -- saving ------------------------------------------------------------------------------------
    def manifest(self, **extra) -> dict[str, Any]:
        settings = self.settings or IndexSettings(self.index_kind)
        embedder = self.embedder
        checkpoint = None
        if embedder is not None:
            state = embedder.checkpoint.state
            checkpoint = {
                "path": str(state.get("source_checkpoint", embedder.checkpoint.path)),
                "epoch": embedder.checkpoint.epoch,
                "fingerprint": embedder.fingerprint,
            }
        return {
            "format": INDEX_FORMAT,
            "gca_pyg": __version__,
            "created": self.created,
            "updated": _now(),
            "count": len(self),
            "dim": self.dim,
            "metric": "cosine (inner product of L2-normalised embeddings)",
            "index": settings.to_dict(),
            "checkpoint": checkpoint,
            "precision": None if embedder is None else embedder.precision,
            "preprocessing": None
            if embedder is None
            else preprocessing(embedder.checkpoint.config),
            "source": self.source,
            **extra,
        }

    def save(self, index_dir: Union[str, Path], **extra) -> Path:
        """Writes the gallery to `index_dir` (see the module docstring), replacing what a previous
        save of the same gallery wrote there; `extra` keys go into the manifest.

        Raises:
            IndexFolderError: If `index_dir` holds an index embedded by another model.
        """
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)  # finishes an interrupted save first
        if manifest is not None and fingerprint_of(manifest) != self.fingerprint:
            theirs = manifest["checkpoint"]
            by = f"another checkpoint ({theirs['path']})" if theirs else "no checkpoint"
            raise IndexFolderError(
                f"{index_dir} holds an index embedded by {by}; save to another folder"
            )
        index = self.index
        next_dir = index_dir / NEXT
        try:
            next_dir.mkdir(parents=True, exist_ok=True)
            _write_items(next_dir / ITEMS, self.gallery.paths, self.gallery.labels)
            np.save(next_dir / EMBEDDINGS, np.asarray(self.gallery.embeddings, dtype=np.float32))
            faiss.write_index(index, str(next_dir / FAISS_FILE))
            if self.embedder is not None and (
                manifest is None or not (index_dir / MODEL_FILE).is_file()
            ):
                save_checkpoint(self._model_state(), next_dir / MODEL_FILE)
            (next_dir / MANIFEST).write_text(json.dumps(self.manifest(**extra), indent=2) + "\n")
        except (OSError, RuntimeError) as error:  # faiss reports a failed write as RuntimeError
            shutil.rmtree(next_dir, ignore_errors=True)
            reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
            raise IndexFolderError(
                f"could not write the index to {index_dir} ({reason}); what was there is "
                "unchanged: free space or choose another folder"
            ) from None
        _commit(index_dir)
        return index_dir

    @property
    def fingerprint(self) -> Optional[str]:
        """The fingerprint of the model that embedded the gallery (None: no model)."""
        return None if self.embedder is None else self.embedder.fingerprint

    def _model_state(self) -> dict[str, Any]:
        """What ``model.pt`` holds: a checkpoint without the optimiser state."""
        checkpoint = self.embedder.checkpoint
        state = checkpoint.state
        return {
            "config": state["config"],
            "model": state["model"],
            "classes": state["classes"],
            "training": {"epoch": checkpoint.epoch},
            "source_checkpoint": str(state.get("source_checkpoint", checkpoint.path)),
        }


def _names(
    images: Sequence[ImageSource], names: Optional[Sequence[str]], start: int, prefix="image"
) -> list[str]:
    if names is not None:
        names = [str(name) for name in names]
        if len(names) != len(images):
            raise ConfigError(f"got {len(images)} images but {len(names)} names")
        return names
    return [
        str(image) if isinstance(image, (str, os.PathLike)) else f"{prefix}-{start + i}"
        for i, image in enumerate(images)
    ]
