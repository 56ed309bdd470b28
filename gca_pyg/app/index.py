"""``python -m gca_pyg.index [CHECKPOINT] (--images DIR | --config NAME --data-root DIR |
--embeddings EMB [--items ITEMS.csv]) --out DIR``

Embeds a gallery with a trained model and writes a searchable index folder (see
:mod:`gca_pyg.retriever` for its files): every image under ``--images DIR`` (recursively; labels
from the folder names with ``--label-folders``), or one split of a data set (``--config NAME
--data-root DIR [--split test]``, labelled by class). Images go through the checkpoint's test
transform in batches, on ``--device``, in bf16 where the device has native bf16, and are
L2-normalised. The index is exact up to 50,000 images and IVF above (``--index auto``), or the
kind asked for (see :mod:`gca_pyg.vector_index`); an approximate one is calibrated to recall@10 ≥
``--target-recall`` against exact search, with a margin, on gallery images held out of it while
it is measured, and that recall is printed.

* ``--embeddings EMB`` indexes rows embedded elsewhere (a ``.npy`` of one row per item, or the
  ``.npz``/``.pt`` of ``python -m gca_pyg.evaluate --export``), named by ``--items ITEMS.csv``
  (``path`` and ``label`` columns) where given; with a CHECKPOINT the folder is as any other, and
  without one it has no model and is searched with vectors (``search --vectors Q.npy``).
* ``--append`` adds the images not indexed yet to an existing index folder.
* An interrupted run (Ctrl-C, a crash, a full disk) keeps what it embedded in
  ``INDEX_DIR/.partial``; the same command continues from there.
* Unreadable images are skipped and listed in ``INDEX_DIR/unreadable.txt``; past 1% of the images,
  the run stops (what was embedded is kept).
* A checkpoint that is not one of ``gca_pyg``, an empty folder, or an index folder written with
  another checkpoint: one line on standard error, exit status 2, nothing overwritten.

``torchrun --nproc-per-node W -m gca_pyg.index ...`` embeds every chunk of images in W shares; rank
0 gathers them and writes.
"""

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from gca_pyg.checkpoint import RunCheckpoint, open_checkpoint
from gca_pyg.config import add_override_argument, available_configs, load_config
from gca_pyg.data import ImageFileDataset, find_images, get_dataset
from gca_pyg.data.base import MAX_UNREADABLE_FRACTION
from gca_pyg.distributed import Context, all_gather_objects, setup, teardown
from gca_pyg.errors import (
    ConfigError,
    DatasetNotFoundError,
    GcaError,
    UnreadableImagesError,
    warn,
)
from gca_pyg.retriever import (
    ITEMS,
    MANIFEST,
    PARTIAL,
    Embedder,
    IndexFolderError,
    Retriever,
    fingerprint_of,
    read_items,
    read_manifest,
    read_vectors,
)
from gca_pyg.runtime import resolve_device, retain_freed_memory
from gca_pyg.vector_index import INDEX_KINDS, RECALL_MARGIN, RERANK_FACTOR, TARGET_RECALL

#: Images embedded between two saves of progress (what an interrupted run keeps).
CHUNK = 1024
#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130
UNREADABLE_FILE = "unreadable.txt"


@dataclass
class Gallery:
    """The images a run indexes, in order: a name (the path, or ``dataset:split/i``) and label
    each, and where they come from."""

    names: list[str]
    labels: list[Optional[str]]
    source: dict
    dataset: Optional[object] = None  # a data set whose items are not files (the demo)
    positions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.positions = {name: i for i, name in enumerate(self.names)}


def find_gallery(args: argparse.Namespace) -> Gallery:
    """The images of ``--images`` or of ``--config/--data-root/--split``.

    Raises:
        DatasetNotFoundError: If the folder does not exist or holds no images.
    """
    if args.images is not None:
        folder = Path(args.images).expanduser()
        if not folder.is_dir():
            raise DatasetNotFoundError(f"--images {args.images}: no such folder")
        files = find_images(folder)
        if not files:
            raise DatasetNotFoundError(
                f"--images {args.images} holds no images (.jpg, .png, .webp, ...) in it or its "
                "subfolders; point it at the folder of your gallery"
            )
        labels = [
            (path.parent.name if path.parent != folder else None) if args.label_folders else None
            for path in files
        ]
        source = {"images": str(folder.resolve()), "label_folders": args.label_folders}
        return Gallery([str(path.resolve()) for path in files], labels, source)
    config = load_config(args.config, data_root=args.data_root)
    data = config.data
    try:
        dataset = get_dataset(data.dataset, data.root, args.split)
    except ValueError as error:  # a split the data set does not have
        raise ConfigError(f"--split {args.split}: {error}") from None
    source = {"dataset": data.dataset, "root": data.root, "split": args.split}
    labels = [dataset.classes[label] for label in dataset.labels.tolist()]
    if isinstance(dataset, ImageFileDataset):
        names = [str(Path(path).resolve()) for path in dataset.paths]
        return Gallery(names, labels, {**source, "files": True})
    names = [f"{data.dataset}:{args.split}/{i}" for i in range(len(dataset))]
    return Gallery(names, labels, {**source, "files": False}, dataset=dataset)


class Progress:
    """What an indexing run has embedded so far, in ``INDEX_DIR/.partial``: ``run.json`` (the
    checkpoint's fingerprint) and one ``chunk-N.npz`` per chunk (names, embeddings, readable)."""

    def __init__(self, index_dir: Path):
        self.folder = index_dir / PARTIAL

    def fingerprint(self) -> Optional[str]:
        path = self.folder / "run.json"
        return json.loads(path.read_text())["fingerprint"] if path.is_file() else None

    def start(self, fingerprint: str, checkpoint: str):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "run.json"
        if not path.is_file():
            path.write_text(json.dumps({"fingerprint": fingerprint, "checkpoint": checkpoint}))

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz")) if self.folder.is_dir() else []

    def read(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names, embeddings and readable flags of every chunk written so far."""
        names, embeddings, readable = [], [], []
        for path in self.chunks():
            with np.load(path) as chunk:
                names += chunk["names"].tolist()
                embeddings.append(chunk["embeddings"])
                readable.append(chunk["readable"])
        if not names:
            return [], np.empty((0, 0), np.float32), np.empty(0, bool)
        return names, np.concatenate(embeddings), np.concatenate(readable)

    def write(self, names: list[str], embeddings: np.ndarray, readable: np.ndarray):
        number = len(self.chunks())
        path = self.folder / f"chunk-{number:06d}.npz"
        temporary = self.folder / f".chunk-{number:06d}.tmp.npz"
        np.savez(temporary, names=np.array(names), embeddings=embeddings, readable=readable)
        os.replace(temporary, path)


@dataclass
class Plan:
    """What rank 0 decided: the gallery positions to embed, or the error every process stops on."""

    pending: Optional[np.ndarray] = None
    error: Optional[str] = None
    error_type: str = "GcaError"
    kept: int = 0


ERRORS = {
    cls.__name__: cls for cls in (GcaError, ConfigError, IndexFolderError, DatasetNotFoundError)
}


def check_out(
    out: Path, fingerprint: Optional[str], append: bool, checkpoint: Optional[str]
) -> Optional[dict]:
    """Checks that `out` may receive this run's index (of the model of `fingerprint`; None: of
    embeddings without a checkpoint); returns its manifest when it holds one.

    Raises:
        IndexFolderError: If `out` holds something else, an index or an unfinished run of another
            checkpoint, or an index while `append` is not set.
    """
    if out.exists() and not out.is_dir():
        raise IndexFolderError(f"--out {out} is a file; choose a folder for the index")
    manifest = read_manifest(out) if out.is_dir() else None  # finishes an interrupted save
    progress = Progress(out)
    if manifest is not None:
        theirs = manifest["checkpoint"]
        if fingerprint_of(manifest) != fingerprint:
            by = f"another checkpoint ({theirs['path']})" if theirs else "no checkpoint"
            ours = checkpoint or "embeddings without a checkpoint"
            raise IndexFolderError(
                f"{out} holds an index embedded with {by}; its queries would not match "
                f"{ours}: choose another --out"
            )
        if not append:
            raise IndexFolderError(
                f"{out} already holds an index of {manifest['count']} images; pass --append to "
                "add the images it lacks, or choose another --out"
            )
    elif progress.fingerprint() is not None:
        if progress.fingerprint() != fingerprint:
            raise IndexFolderError(
                f"{out} holds an unfinished indexing run of another checkpoint; continue it with "
                f"that checkpoint, or choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise IndexFolderError(
            f"--out {out} is not empty ({shown}, ...) and holds no index ({MANIFEST}); choose a "
            "new or empty folder"
        )
    return manifest


def plan(args, gallery: Gallery, embedder: Embedder, out: Path) -> tuple[Plan, Optional[dict]]:
    """Rank 0: checks `out` and finds the images still to embed (neither in the index nor in what
    an interrupted run kept)."""
    try:
        manifest = check_out(out, embedder.fingerprint, args.append, str(embedder.checkpoint.path))
    except GcaError as error:
        return Plan(error=str(error), error_type=type(error).__name__), None
    done = set(read_items(out / ITEMS)[0]) if manifest is not None else set()
    names, _, readable = Progress(out).read()
    kept = {name for name, ok in zip(names, readable) if ok}
    pending = [i for i, name in enumerate(gallery.names) if name not in done and name not in kept]
    return Plan(pending=np.array(pending, dtype=np.int64), kept=len(kept - done)), manifest


def embed_pending(
    embedder: Embedder,
    gallery: Gallery,
    pending: np.ndarray,
    progress: Progress,
    context: Context,
) -> tuple[list[str], list[int]]:
    """Embeds the `pending` gallery positions chunk by chunk (:data:`CHUNK` images), each chunk in
    shares across the processes; rank 0 writes every chunk to `progress` as it completes.

    Returns:
        The names of the unreadable images, and how many images each process embedded.

    Raises:
        UnreadableImagesError: Once more than 1% of the gallery could not be read.
    """
    chunks = [pending[start : start + CHUNK] for start in range(0, len(pending), CHUNK)]
    shares = [np.array_split(chunk, context.world_size)[context.rank] for chunk in chunks]
    # This process's images, all chunks in one data set, so that decoding processes start once.
    mine = np.concatenate(shares) if shares else np.empty(0, np.int64)
    if gallery.dataset is not None:
        images = embedder.dataset_items(gallery.dataset, mine.tolist())
    else:
        images = embedder.images([gallery.names[i] for i in mine.tolist()])
    batches, ends, offset = [], [], 0
    for share in shares:
        batches += [[offset + i for i in batch] for batch in embedder.batches(len(share))]
        offset += len(share)
        ends.append(len(batches))
    embedded = embedder.embed_batches(images, batches)

    unreadable: list[str] = []
    embedded_by = [0] * context.world_size
    limit = MAX_UNREADABLE_FRACTION * len(gallery.names)
    bar = tqdm(
        total=len(pending),
        desc="embedding",
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not context.is_main,
    )
    with bar:
        taken = 0
        for chunk, end in zip(chunks, ends):
            parts = [next(embedded) for _ in range(end - taken)]
            taken = end
            mine_z = np.concatenate([z for z, _ in parts] or [np.empty((0, embedder.dim))])
            mine_ok = np.concatenate([ok for _, ok in parts] or [np.empty(0, bool)])
            gathered = all_gather_objects(
                (mine_z.astype(np.float32), mine_ok), context.process_group
            )
            embeddings = np.concatenate([z for z, _ in gathered])
            readable = np.concatenate([ok for _, ok in gathered])
            for rank, (_, ok) in enumerate(gathered):
                embedded_by[rank] += len(ok)
            names = [gallery.names[i] for i in chunk.tolist()]
            if context.is_main:
                progress.write(names, embeddings, readable)
            unreadable += [name for name, ok in zip(names, readable) if not ok]
            bar.update(len(chunk))
            if len(unreadable) > limit:
                raise UnreadableImagesError(
                    f"{len(unreadable)} of {len(gallery.names)} images could not be read (more "
                    f"than {MAX_UNREADABLE_FRACTION:.0%}), e.g. {unreadable[0]}; fix or remove "
                    "them and run the same command again (what was embedded is kept)"
                )
    return unreadable, embedded_by


def finish(
    args,
    embedder: Embedder,
    gallery: Gallery,
    out: Path,
    manifest: Optional[dict],
    unreadable: list[str],
) -> tuple[Retriever, int]:
    """Rank 0: adds what the run embedded, in gallery order, to the index (a new one, or the
    existing one with ``--append``) and saves it.

    Returns:
        The retriever and the number of images added."""
    if manifest is not None:
        retriever = Retriever.load(out, embedder=embedder)
        retriever.target_recall = args.target_recall
        if args.index not in ("auto", retriever.index_kind):
            warn(f"{out} keeps its {retriever.index_kind} index; --index {args.index} is ignored")
        if gallery.source != retriever.source:
            retriever.source.setdefault("appended", []).append(gallery.source)
    else:
        retriever = Retriever(
            embedder,
            index=args.index,
            source=gallery.source,
            target_recall=args.target_recall,
            rerank=args.rerank,
        )
    names, embeddings, readable = Progress(out).read()
    indexed = set(retriever.paths)
    rows = {
        name: row
        for row, (name, ok) in enumerate(zip(names, readable))
        if ok and name in gallery.positions and name not in indexed
    }
    order = sorted(rows, key=gallery.positions.__getitem__)
    if order:
        picked = [rows[name] for name in order]
        retriever.add_embeddings(
            embeddings[picked], order, [gallery.labels[gallery.positions[n]] for n in order]
        )
    retriever.save(out, unreadable=len(unreadable))
    listing = out / UNREADABLE_FILE
    if unreadable:
        listing.write_text("".join(f"{name}\n" for name in unreadable))
    elif listing.exists():
        listing.unlink()
    return retriever, len(order)


def summary(
    retriever: Retriever, added: int, out: Path, unreadable: list[str], seconds: float
) -> str:
    settings = retriever.settings
    lines = [
        f"indexed {added:,} new image(s) in {seconds:.1f} s; {out} holds "
        f"{len(retriever):,} images, {retriever.dim}-d embeddings, {settings.describe()}"
    ]
    if settings.kind != "flat" and settings.recall is not None:
        spread = f" ± {settings.recall_se:.3f}" if settings.recall_se is not None else ""
        measured = (
            f" on {settings.recall_queries:,} gallery images held out of the index while it was "
            "measured (new to it, as queries are)"
            if settings.recall_queries
            else " on gallery images held out of the index while it was measured"
        )
        lines.append(
            f"recall@{settings.recall_k} against exact search: {settings.recall:.3f}{spread} "
            f"(one standard error){measured}; the breadth is the first whose recall less "
            f"{RECALL_MARGIN:g} standard errors reaches the target {retriever.target_recall}"
        )
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        lines.append(
            f"skipped {len(unreadable)} unreadable image(s), listed in "
            f"{out / UNREADABLE_FILE}: {shown}"
        )
    return "\n".join(lines)


def read_item_list(
    items: Optional[str], count: int, labels: Optional[list], embeddings: Path
) -> tuple[list[str], list[Optional[str]]]:
    """The path and label of each of `count` embedded rows: from the ``--items`` CSV (a ``path``
    column, a ``label`` column where known: the ``items.csv`` of an index folder will do), else
    ``EMB:i`` and the `labels` stored beside the embeddings.

    Raises:
        ConfigError: If the CSV is missing, has no ``path`` column, or not one row per embedding.
    """
    if items is None:
        names = [f"{embeddings.name}:{i}" for i in range(count)]
        return names, [None] * count if labels is None else [str(label) for label in labels]
    path = Path(items).expanduser()
    try:
        names, found = read_items(path)
    except FileNotFoundError:
        raise ConfigError(f"--items {items}: no such file") from None
    except (KeyError, UnicodeDecodeError, csv.Error):
        raise ConfigError(
            f"--items {items} is not a CSV with a path column (and a label column where labels "
            "are known), one row per embedding"
        ) from None
    if len(names) != count:
        raise ConfigError(
            f"--items {items} has {len(names):,} rows and --embeddings {embeddings} "
            f"{count:,}: give one row per embedding, in the same order"
        )
    return names, found


def index_embeddings(args: argparse.Namespace) -> int:
    """``--embeddings EMB``: indexes rows embedded elsewhere, with the checkpoint that embedded
    them where given (then images can be searched too) or without (queries are vectors)."""
    started = time.perf_counter()
    path = Path(args.embeddings).expanduser()
    embeddings, stored_labels = read_vectors(path, "--embeddings")
    if len(embeddings) == 0:
        raise ConfigError(f"--embeddings {path} holds no rows; nothing to index")
    if stored_labels is not None and len(stored_labels) != len(embeddings):
        stored_labels = None
    names, labels = read_item_list(args.items, len(embeddings), stored_labels, path)
    embedder = None
    if args.checkpoint is not None:
        checkpoint = open_checkpoint(args.checkpoint, args.overrides)
        embedder = Embedder(checkpoint, device="cpu", batch_size=args.batch_size, num_workers=0)
        if embedder.dim != embeddings.shape[1]:
            raise ConfigError(
                f"--embeddings {path} holds {embeddings.shape[1]}-d rows and {args.checkpoint} "
                f"embeds {embedder.dim}-d ones: give the checkpoint that embedded them, or none"
            )
    out = Path(args.out).expanduser()
    checkpoint_name = None if embedder is None else str(embedder.checkpoint.path)
    fingerprint = None if embedder is None else embedder.fingerprint
    manifest = check_out(out, fingerprint, args.append, checkpoint_name)
    source = {"embeddings": str(path.resolve())}
    if args.items is not None:
        source["items"] = str(Path(args.items).expanduser().resolve())
    if manifest is not None:
        retriever = Retriever.load(out, embedder=embedder)
        if retriever.dim != embeddings.shape[1]:
            raise ConfigError(
                f"--embeddings {path} holds {embeddings.shape[1]}-d rows and {out} "
                f"{retriever.dim}-d ones: they cannot be searched together"
            )
        retriever.target_recall = args.target_recall
        if args.index not in ("auto", retriever.index_kind):
            warn(f"{out} keeps its {retriever.index_kind} index; --index {args.index} is ignored")
        retriever.source.setdefault("appended", []).append(source)
    else:
        retriever = Retriever(
            embedder,
            dim=embeddings.shape[1],
            index=args.index,
            source=source,
            target_recall=args.target_recall,
            rerank=args.rerank,
        )
    indexed = set(retriever.paths)
    new = [row for row, name in enumerate(names) if name not in indexed]
    retriever.add_embeddings(
        embeddings[new], [names[row] for row in new], [labels[row] for row in new]
    )
    retriever.save(out)
    print(summary(retriever, len(new), out, [], time.perf_counter() - started))
    return 0


def run(args: argparse.Namespace, checkpoint: RunCheckpoint, context: Context) -> int:
    started = time.perf_counter()
    embedder = Embedder(
        checkpoint,
        device=str(context.device),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    gallery = find_gallery(args)
    out = Path(args.out).expanduser()
    decided, manifest = plan(args, gallery, embedder, out) if context.is_main else (None, None)
    decided = all_gather_objects(decided, context.process_group)[0]
    if decided.error is not None:
        raise ERRORS.get(decided.error_type, GcaError)(decided.error)
    progress = Progress(out)
    if context.is_main:
        progress.start(embedder.fingerprint, str(checkpoint.path))
        processes = f" in {context.world_size} processes" if context.world_size > 1 else ""
        kept = f"; {decided.kept:,} embedded before are kept" if decided.kept else ""
        print(
            f"gca_pyg: embedding {len(decided.pending):,} of {len(gallery.names):,} images with "
            f"{checkpoint.path} on {embedder.device} ({embedder.precision}){processes}{kept}",
            file=sys.stderr,
        )
    try:
        unreadable, embedded_by = embed_pending(
            embedder, gallery, decided.pending, progress, context
        )
    except KeyboardInterrupt:
        if context.is_main:
            print(
                f"\nInterrupted; what was embedded is kept in {out / PARTIAL}: run the same "
                "command again to continue",
                file=sys.stderr,
            )
        return INTERRUPTED
    if context.is_main:
        retriever, added = finish(args, embedder, gallery, out, manifest, unreadable)
        print(summary(retriever, added, out, unreadable, time.perf_counter() - started))
        if context.world_size > 1:
            counts = " + ".join(str(count) for count in embedded_by)
            print(f"embedded in {context.world_size} processes: {counts} images")
    all_gather_objects(None, context.process_group)  # the others wait for rank 0's save
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.index",
        description="Embed a gallery of images with a trained checkpoint and write a searchable "
        "index folder.",
        epilog=f"shipped configs for --config: {', '.join(available_configs())}",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        nargs="?",
        help="a .pt file or a run folder (its last.pt); with --embeddings, the model that "
        "embedded them, or none (then queries are vectors)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="index every image under DIR")
    source.add_argument(
        "--config", metavar="NAME", help="index a split of the data set of a config"
    )
    source.add_argument(
        "--embeddings",
        metavar="EMB",
        help="index rows embedded elsewhere: a .npy file (N, D), or the .npz/.pt of "
        "python -m gca_pyg.evaluate --export",
    )
    parser.add_argument(
        "--items",
        metavar="ITEMS.csv",
        help="with --embeddings: a CSV with a path (and label) column, one row per embedding",
    )
    parser.add_argument("--data-root", metavar="DIR", help="the data set folder, with --config")
    parser.add_argument(
        "--split", default="test", help="the split to index, with --config (default: test)"
    )
    parser.add_argument(
        "--label-folders",
        action="store_true",
        help="with --images: label each image by the name of its folder",
    )
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index folder")
    parser.add_argument(
        "--index",
        default="auto",
        choices=INDEX_KINDS,
        help="auto (default): exact up to 50,000 images, IVF beyond; flat: exact (IndexFlatIP); "
        "ivf (IVF,Flat); hnsw (HNSW32,Flat); ivf-sq8 (IVF,SQ8: a quarter of the memory); ivf-pq "
        "(IVF,PQ: a thirty-second)",
    )
    parser.add_argument(
        "--rerank",
        type=int,
        default=RERANK_FACTOR,
        metavar="F",
        help="ivf-sq8 and ivf-pq: re-score the best F·k of a query exactly from embeddings.npy "
        f"(default: {RERANK_FACTOR}; 1: their approximate scores)",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=TARGET_RECALL,
        metavar="R",
        help=f"recall@10 an approximate index is calibrated to (default: {TARGET_RECALL})",
    )
    parser.add_argument(
        "--append", action="store_true", help="add the images not indexed yet to INDEX_DIR"
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="images per batch")
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="decoding processes (default: 2)"
    )
    add_override_argument(
        parser, "override a config key of the checkpoint, e.g. train.precision=fp32"
    )
    args = parser.parse_args(argv)
    if args.config is None and args.data_root is not None:
        parser.error("--data-root goes with --config")
    if args.embeddings is None and args.checkpoint is None:
        parser.error("CHECKPOINT is needed to embed images (only --embeddings goes without)")
    if args.embeddings is None and args.items is not None:
        parser.error("--items goes with --embeddings")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    retain_freed_memory()
    context = None
    try:
        if not 0 < args.target_recall <= 1:
            raise ConfigError(f"--target-recall must be in (0, 1], got {args.target_recall}")
        if args.rerank < 1:
            raise ConfigError(f"--rerank must be at least 1, got {args.rerank}")
        if args.embeddings is not None:
            return index_embeddings(args)
        if args.device is not None:
            args.overrides = [*args.overrides, f"train.device={args.device}"]
        checkpoint = open_checkpoint(args.checkpoint, args.overrides)
        train = checkpoint.config.train
        context = setup(resolve_device(train.device), train.dist_backend, train.dist_timeout)
        return run(args, checkpoint, context)
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if context is not None:
            teardown(context)


if __name__ == "__main__":
    sys.exit(main())
