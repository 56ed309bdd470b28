"""What every dataset shares: the retrieval-dataset interface and image decoding with substitution
of unreadable files.

A retrieval dataset is one split of class-disjoint data: ``labels`` (a 1-D ``torch.long`` tensor of
contiguous ids ``0..C-1``), ``classes`` (their names, ``classes[label]``), ``len(dataset)`` and
``dataset[i] -> (image, label)``.

Unreadable images. :class:`ImageFileDataset` decodes with Pillow. When a file cannot be decoded it
warns once for that file, marks it failed and returns the next readable sample of the same class
instead; once more than 1% of the split's images have failed it raises
:class:`~gca_pyg.errors.UnreadableImagesError`. The failure flags live in one shared-memory tensor,
so failures seen inside ``DataLoader`` workers (forked or spawned) are visible to the main process:
the trainer reads :attr:`ImageFileDataset.unreadable_count` and calls
:meth:`ImageFileDataset.check_unreadable`, which raises the one-line error in the main process (in a
worker PyTorch re-raises it wrapped with the worker's traceback).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gca_pyg.errors import UnreadableImagesError

#: Share of a split's images that may fail to decode before loading stops.
MAX_UNREADABLE_FRACTION = 0.01

DEMO_HINT = "`python -m gca_pyg.train demo` runs without any download"

#: What Pillow raises on a corrupt, truncated, vanished or absurdly large file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_rgb(path) -> Image.Image:
    """The image file `path` decoded as RGB.

    Raises:
        One of :data:`DECODE_ERRORS` if it cannot be read or decoded.
    """
    with Image.open(path) as image:
        return image.convert("RGB")


class RetrievalDataset(Dataset):
    """One split of a class-disjoint retrieval dataset.

    Args:
        labels: contiguous class ids ``0..C-1``, one per item.
        classes: the ``C`` class names, ``classes[label]``.
        transform: applied to each image before it is returned.
    """

    def __init__(
        self, labels: Sequence[int], classes: Sequence[str], transform: Optional[Callable] = None
    ):
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def unreadable_count(self) -> int:
        """How many images failed to decode so far (always 0 for data that is not decoded)."""
        return 0

    def check_unreadable(self) -> None:
        """Raise :class:`UnreadableImagesError` if too many images failed; no-op here."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


class ImageFileDataset(RetrievalDataset):
    """Image files decoded with Pillow (RGB), unreadable ones replaced by their class-mates.

    Args:
        paths: one image file per item.
        labels: contiguous class ids ``0..C-1``, one per item.
        classes: the ``C`` class names.
        transform: applied to the decoded ``PIL.Image``; without one the image itself is returned.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        classes: Sequence[str],
        transform: Optional[Callable] = None,
    ):
        super().__init__(labels, classes, transform)
        self.paths = [str(p) for p in paths]
        # Shared memory: writes from DataLoader workers are seen by the main process.
        self._failed = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    @property
    def unreadable_count(self) -> int:
        return int(self._failed.sum())

    @property
    def unreadable_paths(self) -> list[str]:
        """The files that failed to decode so far."""
        return [self.paths[i] for i in self._failed.nonzero().flatten().tolist()]

    def check_unreadable(self) -> None:
        failed = self.unreadable_count
        if failed > MAX_UNREADABLE_FRACTION * len(self):
            first = self.unreadable_paths[0]
            raise UnreadableImagesError(
                f"{failed} of {len(self)} images could not be decoded (more than "
                f"{MAX_UNREADABLE_FRACTION:.0%}), e.g. {first}; re-extract the dataset archive or "
                f"remove the broken files"
            )

    def __getitem__(self, index: int):
        image = self._decode(index)
        if image is None:
            image = self._substitute(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def _substitute(self, index: int) -> Image.Image:
        """The first decodable image of ``index``'s class after it (wrapping around)."""
        mates = torch.nonzero(self.labels == self.labels[index]).flatten()
        after = mates.roll(-int(torch.searchsorted(mates, index)))[1:]
        for mate in after.tolist():
            image = self._decode(mate)
            if image is not None:
                return image
        raise UnreadableImagesError(
            f"no image of class {self.classes[int(self.labels[index])]!r} can be decoded (e.g. "
            f"{self.paths[index]}); re-extract the dataset archive or remove the class"
        )

    def _decode(self, index: int) -> Optional[Image.Image]:
        """Item ``index`` as an RGB image, or ``None`` (counted, warned once) if unreadable."""
        if self._failed[index]:
            return None
        try:
            return open_rgb(self.paths[index])
        except DECODE_ERRORS as error:
            self._failed[index] = True
            warnings.warn(
                f"unreadable image {self.paths[index]} ({error}); using another image of "
                f"its class instead",
                RuntimeWarning,
                stacklevel=2,
            )
            self.check_unreadable()
            return None


def check_split(split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ValueError(f"split must be one of {', '.join(map(repr, valid))}, not {split!r}")
