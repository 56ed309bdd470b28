"""Your own images: a folder per class."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional

from gca_pyg.data.base import DEMO_HINT, ImageFileDataset, check_split
from gca_pyg.errors import DatasetLayoutError, DatasetNotFoundError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageFolderByClass(ImageFileDataset):
    """Images in ``root/<class name>/*.jpg`` (or ``.png``, ``.webp``, ...), split by class.

    Either ``root`` holds the class folders, and the first half of them in name order trains while
    the second half tests, or ``root`` holds ``train/`` and ``test/``, each a folder of class
    folders, used as given. Hidden entries (``.*``, including macOS ``._*`` files) and class folders
    without images are skipped; labels follow the class names' order.

    Args:
        root: the folder of class folders, or of ``train/`` and ``test/``.
        split: ``"train"`` or ``"test"``.
        transform: applied to each ``PIL.Image``.
    """

    def __init__(self, root, split: str = "train", transform: Optional[Callable] = None):
        check_split(split, ("train", "test"))
        if root is None:
            raise DatasetNotFoundError(
                f"the folder dataset needs a data root: pass --data-root DIR, a folder of class "
                f"folders (DIR/<class>/*.jpg); {DEMO_HINT}"
            )
        if not Path(root).expanduser().is_dir():
            raise DatasetNotFoundError(
                f"image folder {root} does not exist: point the data root at a folder of "
                f"class folders (root/<class>/*.jpg); {DEMO_HINT}"
            )
        self.root = Path(root).expanduser()
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            folder = self.root / split
            by_class = _images_by_class(folder)
            if split == "train":
                shared = by_class.keys() & _images_by_class(self.root / "test").keys()
                if shared:
                    warnings.warn(
                        f"{self.root}: train/ and test/ share {len(shared)} class names "
                        f"(e.g. {min(shared)!r}); retrieval is usually measured on "
                        f"unseen classes",
                        UserWarning,
                        stacklevel=2,
                    )
        else:
            folder = self.root
            by_class = _images_by_class(folder)
            names = sorted(by_class)
            half = names[: len(names) // 2] if split == "train" else names[len(names) // 2 :]
            by_class = {name: by_class[name] for name in half}
        if len(by_class) < 2:
            raise DatasetLayoutError(
                f"{folder} gives the {split} split {len(by_class)} class folder(s) with images; it "
                f"needs at least 2 (root/<class>/*.jpg split in halves, or root/train/<class>/ and "
                f"root/test/<class>/)"
            )
        classes = sorted(by_class)
        paths = [path for name in classes for path in by_class[name]]
        labels = [label for label, name in enumerate(classes) for _ in by_class[name]]
        super().__init__(paths, labels, classes, transform)
        self.split = split


def _images_by_class(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files in name order, for the class folders directly in ``folder``."""
    by_class = {}
    for class_dir in folder.iterdir():
        if class_dir.name.startswith(".") or not class_dir.is_dir():
            continue
        images = sorted(
            path
            for path in class_dir.iterdir()
            if not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file()
        )
        if images:
            by_class[class_dir.name] = images
    return by_class


def find_images(folder: Path) -> list[Path]:
    """The image files (by extension, :data:`IMAGE_EXTENSIONS`) in `folder` and all its subfolders,
    in path order; hidden files and folders (``.*``) are skipped."""
    folder = Path(folder)
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
