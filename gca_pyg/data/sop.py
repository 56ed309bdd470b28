"""Stanford Online Products, read in place from the extracted ``Stanford_Online_Products.zip``."""

from __future__ import annotations

import numpy as np

from gca_pyg.data.official import ArchiveLayout, OfficialDataset, SplitIndex


class StanfordOnlineProducts(OfficialDataset):
    """Stanford Online Products: the classes of ``Ebay_train.txt`` train, those of ``Ebay_test.txt``
    test (59,551 images / 11,318 classes and 60,502 / 11,316).

    ``root`` is the extracted ``Stanford_Online_Products`` folder or the folder holding it. Class
    names are the official class ids (products have no other name). Arguments as
    :class:`~gca_pyg.data.official.OfficialDataset`.
    """

    layout = ArchiveLayout(
        name="Stanford Online Products",
        marker="Ebay_train.txt",
        folder="Stanford_Online_Products",
        archive="Stanford_Online_Products.zip",
        source="https://cvgl.stanford.edu/projects/lifted_struct/",
    )
    official_counts = {
        "train": {"images in Ebay_train.txt": 59_551, "classes in Ebay_train.txt": 11_318},
        "test": {"images in Ebay_test.txt": 60_502, "classes in Ebay_test.txt": 11_316},
    }

    def read_split(self, split: str) -> SplitIndex:
        index = f"Ebay_{split}.txt"
        rows = self.layout.read_rows(
            self.root / index, 4, header="image_id class_id super_class_id path"
        )
        class_ids = np.array([int(row[1]) for row in rows], dtype=np.int64)
        names = {int(cid): str(cid) for cid in np.unique(class_ids)}
        return SplitIndex(
            [self.root / row[3] for row in rows],
            class_ids,
            names,
            {f"images in {index}": len(rows), f"classes in {index}": len(names)},
            index,
        )
