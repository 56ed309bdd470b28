"""CUB-200-2011, read in place from the extracted ``CUB_200_2011.tgz``."""

from __future__ import annotations

import numpy as np

from gca_pyg.data.official import ArchiveLayout, OfficialDataset, SplitIndex, first_half_of_classes


class CUB200(OfficialDataset):
    """CUB-200-2011 birds: classes 1–100 train, 101–200 test (5,864 / 5,924 images).

    ``root`` is the extracted ``CUB_200_2011`` folder or the folder holding it. Reads
    ``images.txt``, ``image_class_labels.txt`` and ``classes.txt``; the per-image
    ``train_test_split.txt`` is ignored, as metric learning splits by class. Arguments as
    :class:`~gca_pyg.data.official.OfficialDataset`.
    """

    layout = ArchiveLayout(
        name="CUB-200-2011",
        marker="images.txt",
        folder="CUB_200_2011",
        archive="CUB_200_2011.tgz",
        source="https://www.vision.caltech.edu/datasets/cub_200_2011/",
    )
    official_counts = {
        "train": {
            "images in images.txt": 11_788,
            "classes in classes.txt": 200,
            "images of the first 100 classes": 5_864,
        },
        "test": {
            "images in images.txt": 11_788,
            "classes in classes.txt": 200,
            "images of the last 100 classes": 5_924,
        },
    }

    def read_split(self, split: str) -> SplitIndex:
        read = self.layout.read_rows
        paths = dict(read(self.root / "images.txt", 2))
        class_of = dict(read(self.root / "image_class_labels.txt", 2))
        names = {int(cid): name for cid, name in read(self.root / "classes.txt", 2)}
        if class_of.keys() != paths.keys():
            raise self.layout.fail(
                self.root, "image_class_labels.txt and images.txt list different image ids"
            )
        image_ids = sorted(paths, key=int)
        class_ids = np.array([int(class_of[i]) for i in image_ids], dtype=np.int64)
        unknown = set(class_ids.tolist()) - names.keys()
        if unknown:
            raise self.layout.fail(
                self.root,
                f"image_class_labels.txt uses class {min(unknown)}, "
                f"which classes.txt does not name",
            )
        keep = first_half_of_classes(class_ids, split)
        files = [self.root / "images" / paths[i] for i, kept in zip(image_ids, keep) if kept]
        half = "first" if split == "train" else "last"
        return SplitIndex(
            files,
            class_ids[keep],
            names,
            {
                "images in images.txt": len(image_ids),
                "classes in classes.txt": len(names),
                f"images of the {half} 100 classes": len(files),
            },
            "images.txt",
        )
