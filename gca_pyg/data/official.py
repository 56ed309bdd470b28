"""Reading an official benchmark archive in place: find its folder, read its index files, check its
layout and counts, and number its classes — the part CUB, Cars196, SOP and In-Shop share."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from gca_pyg.data.base import DEMO_HINT, ImageFileDataset, check_split
from gca_pyg.errors import DatasetLayoutError, DatasetNotFoundError


@dataclass(frozen=True)
class ArchiveLayout:
    """Where an official dataset comes from and how to find and check its extracted folder.

    Attributes:
        name: the dataset's name in messages, e.g. ``"CUB-200-2011"``.
        marker: a file inside the extracted folder that identifies it, e.g. ``"images.txt"``.
        folder: the folder the archive extracts to (``None`` if it has none of its own).
        archive: what the user downloads, e.g. ``"CUB_200_2011.tgz"``.
        source: where the official archive comes from.
    """

    name: str
    marker: str
    folder: Optional[str]
    archive: str
    source: str

    def find(self, root) -> Path:
        """The extracted folder: ``root`` or a folder directly inside it, holding the marker."""
        if root is None:
            raise DatasetNotFoundError(
                f"{self.name} needs a data root (the folder holding {self.marker}): download "
                f"{self.archive} from {self.source}, extract it and pass its folder; {DEMO_HINT}"
            )
        root = Path(root).expanduser()
        candidates = [root]
        if self.folder is not None:
            candidates.append(root / self.folder)
        if root.is_dir():
            candidates += sorted(
                child
                for child in root.iterdir()
                if child.is_dir() and not child.name.startswith(".")
            )
        for folder in candidates:
            if (folder / self.marker).is_file():
                return folder
        looked = (
            f"no {self.marker} in {root} or the folders directly inside it"
            if root.is_dir()
            else f"{root} does not exist"
        )
        raise DatasetNotFoundError(
            f"{self.name} not found: {looked}; download {self.archive} from {self.source} and "
            f"extract it there; {DEMO_HINT}"
        )

    def fail(self, where, problem: str) -> DatasetLayoutError:
        """A layout error: ``problem`` found at ``where``, and to extract the archive again."""
        return DatasetLayoutError(
            f"{self.name} at {where}: {problem}; re-extract {self.archive} (from {self.source})"
        )

    def read_rows(
        self, path: Path, fields: int, header: Optional[str] = None, skip: int = 0
    ) -> list[list[str]]:
        """Whitespace-separated rows of an index file, each with ``fields`` fields.

        ``skip`` leading lines are dropped, then the header line (if given) must match.
        """
        if not path.is_file():
            raise self.fail(path.parent, f"{path.name} is missing")
        lines = path.read_text(encoding="utf-8").splitlines()[skip:]
        if header is not None:
            if not lines or lines[0].split() != header.split():
                raise self.fail(path, f"the header is not {header!r}")
            lines = lines[1:]
        rows = [line.split() for line in lines if line.strip()]
        for number, row in enumerate(rows):
            if len(row) < fields:
                raise self.fail(path, f"row {number + 1} has {len(row)} fields, not {fields}")
        return rows

    def require_files(self, paths: Sequence[Path], index_file: str) -> None:
        """Every image the index lists must exist (a half-extracted archive fails here)."""
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise self.fail(
                missing[0].parent,
                f"{len(missing):,} of the {len(paths):,} images "
                f"that {index_file} lists are missing, e.g. {missing[0]}",
            )

    def check_counts(self, where, found: dict, official: dict) -> None:
        """Compare counts with the official archive's (keys: what is counted)."""
        for what, expected in official.items():
            if found[what] != expected:
                raise self.fail(
                    where,
                    f"{found[what]:,} {what}, the official archive has "
                    f"{expected:,} (pass verify_counts=False for a deliberately "
                    f"reduced copy)",
                )


class SplitIndex(NamedTuple):
    """What a dataset's index files say about one split.

    Attributes:
        files: the split's image files.
        class_ids: the official class id of each file.
        class_names: official class id -> class name.
        counts: what is counted (e.g. ``"images in images.txt"``) -> the count found, compared
            with the official archive's when counts are verified.
        index_file: the file that lists the images, named in messages.
        numbering: the class ids labelled ``0..C-1`` in sorted order (default: the split's own).
    """

    files: list
    class_ids: np.ndarray
    class_names: Mapping
    counts: dict
    index_file: str
    numbering: Optional[np.ndarray] = None


class OfficialDataset(ImageFileDataset):
    """One split of an official benchmark, read in place from its extracted archive.

    Subclasses set :attr:`layout`, :attr:`splits` and :attr:`official_counts` and read their index
    files in :meth:`read_split`. Labels number the split's classes ``0..C-1`` in official id order.

    Args:
        root: the extracted folder or the folder holding it.
        split: one of :attr:`splits`.
        transform: applied to each ``PIL.Image``.
        verify_counts: check the official image and class counts (turn off for a deliberately
            reduced copy; that every listed image exists is always checked).
    """

    layout: ArchiveLayout
    splits: Sequence[str] = ("train", "test")
    #: split -> what is counted -> the official archive's count.
    official_counts: Mapping[str, Mapping[str, int]]

    def __init__(
        self,
        root,
        split: str = "train",
        transform: Optional[Callable] = None,
        verify_counts: bool = True,
    ):
        check_split(split, self.splits)
        self.root = self.layout.find(root)
        self.split = split
        index = self.read_split(split)
        self.layout.require_files(index.files, index.index_file)
        if verify_counts:
            self.layout.check_counts(self.root, index.counts, self.official_counts[split])
        ids = np.unique(index.class_ids if index.numbering is None else index.numbering)
        labels = np.searchsorted(ids, index.class_ids)
        super().__init__(
            index.files, labels, [index.class_names[i] for i in ids.tolist()], transform
        )

    def read_split(self, split: str) -> SplitIndex:
        """Read the index files under :attr:`root` for ``split``."""
        raise NotImplementedError


def first_half_of_classes(class_ids: np.ndarray, split: str) -> np.ndarray:
    """Mask of the items in ``split``: the lower half of the sorted class ids trains, the rest
    tests.

    For the official archives this is CUB 1–100 / 101–200 and Cars 1–98 / 99–196.
    """
    ordered = np.unique(class_ids)
    train_classes = ordered[: len(ordered) // 2]
    in_train = np.isin(class_ids, train_classes)
    return in_train if split == "train" else ~in_train
