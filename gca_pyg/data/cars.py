"""Cars196 (Stanford Cars), read in place from ``car_ims/`` and ``cars_annos.mat``.

Reading the ``.mat`` file needs scipy, the optional extra ``gca-pyg[cars]``.
"""

from __future__ import annotations

import numpy as np

from gca_pyg.data.official import ArchiveLayout, OfficialDataset, SplitIndex, first_half_of_classes
from gca_pyg.errors import GcaError


class Cars196(OfficialDataset):
    """Cars196: classes 1–98 train, 99–196 test (8,054 / 8,131 images).

    ``root`` is the folder holding ``cars_annos.mat`` and ``car_ims/``, or the folder holding that.
    Reads the ``annotations`` struct array of ``cars_annos.mat`` (``relative_im_path``, ``class``;
    the per-image ``test`` flag is ignored, as metric learning splits by class) and its
    ``class_names``. Arguments as :class:`~gca_pyg.data.official.OfficialDataset`.
    """

    layout = ArchiveLayout(
        name="Cars196",
        marker="cars_annos.mat",
        folder=None,
        archive="car_ims.tgz and cars_annos.mat",
        source="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline now: use a mirror "
        "of those two files; the Kaggle car_data/ folders are a different layout)",
    )
    official_counts = {
        "train": {
            "images in cars_annos.mat": 16_185,
            "classes in cars_annos.mat": 196,
            "images of the first 98 classes": 8_054,
        },
        "test": {
            "images in cars_annos.mat": 16_185,
            "classes in cars_annos.mat": 196,
            "images of the last 98 classes": 8_131,
        },
    }

    def read_split(self, split: str) -> SplitIndex:
        annotations = self.root / "cars_annos.mat"
        rel_paths, class_ids, names = self._read_annotations(annotations)
        low, high = class_ids.min(), class_ids.max()
        if low < 1 or high > len(names):
            raise self.layout.fail(
                annotations, f"class ids run {low}..{high} but class_names has {len(names)} names"
            )
        keep = first_half_of_classes(class_ids, split)
        files = [self.root / path for path, kept in zip(rel_paths, keep) if kept]
        half = "first" if split == "train" else "last"
        return SplitIndex(
            files,
            class_ids[keep],
            dict(enumerate(names, start=1)),
            {
                "images in cars_annos.mat": len(rel_paths),
                "classes in cars_annos.mat": len(names),
                f"images of the {half} 98 classes": len(files),
            },
            "cars_annos.mat",
        )

    def _read_annotations(self, path) -> tuple[list[str], np.ndarray, list[str]]:
        """``(relative image paths, class ids 1..196, class names)`` from ``cars_annos.mat``."""
        try:
            from scipy.io import loadmat
        except ImportError:
            raise GcaError(
                'reading Cars196\'s cars_annos.mat needs scipy: pip install "gca-pyg[cars]"'
            ) from None
        try:
            mat = loadmat(path, squeeze_me=True)
            annotations = np.atleast_1d(mat["annotations"])
            rel_paths = [str(p) for p in np.atleast_1d(annotations["relative_im_path"])]
            class_ids = np.atleast_1d(annotations["class"]).astype(np.int64)
            names = [str(n) for n in np.atleast_1d(mat["class_names"])]
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise self.layout.fail(path, f"not the official annotation file ({error})") from None
        return rel_paths, class_ids, names
