"""In-Shop Clothes Retrieval (DeepFashion), read in place from ``Img/img/`` and
``Eval/list_eval_partition.txt``."""

from __future__ import annotations

import numpy as np

from gca_pyg.data.official import ArchiveLayout, OfficialDataset, SplitIndex


class InShop(OfficialDataset):
    """In-Shop Clothes Retrieval: 25,882 training images of 3,997 items; 14,218 queries searched
    in a gallery of 12,612 over 3,985 other items.

    ``root`` is the folder holding ``Eval/`` and ``Img/``, or the folder holding that. ``split`` is
    ``"train"``, ``"query"`` or ``"gallery"``; query and gallery number their items with one
    mapping, so their labels compare. Class names are the item ids (``id_00000001``). Besides the
    files, the count on the partition file's first line is always checked. Arguments as
    :class:`~gca_pyg.data.official.OfficialDataset`.
    """

    layout = ArchiveLayout(
        name="In-Shop Clothes Retrieval",
        marker="Eval/list_eval_partition.txt",
        folder=None,
        archive="Img/img.zip (with Eval/list_eval_partition.txt)",
        source="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
    )
    splits = ("train", "query", "gallery")
    official_counts = {
        "train": {"rows": 52_712, "train images": 25_882, "train items": 3_997},
        "query": {"rows": 52_712, "query images": 14_218, "query and gallery items": 3_985},
        "gallery": {"rows": 52_712, "gallery images": 12_612, "query and gallery items": 3_985},
    }

    def read_split(self, split: str) -> SplitIndex:
        partition = self.root / "Eval" / "list_eval_partition.txt"
        rows = self.layout.read_rows(
            partition, 3, header="image_name item_id evaluation_status", skip=1
        )
        stated = partition.read_text(encoding="utf-8").split(maxsplit=1)[0]
        if stated != str(len(rows)):
            raise self.layout.fail(
                partition, f"line 1 states {stated} images but {len(rows):,} rows follow"
            )
        names, items, status = np.array([row[:3] for row in rows], dtype=str).reshape(-1, 3).T
        unknown = set(status.tolist()) - set(self.splits)
        if unknown:
            raise self.layout.fail(partition, f"unknown evaluation_status {min(unknown)!r}")
        in_split = status == split
        # query and gallery share one item numbering so that their labels can be compared.
        side = np.isin(status, ("train",) if split == "train" else ("query", "gallery"))
        numbering = np.unique(items[side])
        items_counted = "train items" if split == "train" else "query and gallery items"
        return SplitIndex(
            [self.root / "Img" / name for name in names[in_split]],
            items[in_split],
            {item: item for item in numbering.tolist()},
            {
                "rows": len(rows),
                f"{split} images": int(in_split.sum()),
                items_counted: len(numbering),
            },
            "list_eval_partition.txt",
            numbering,
        )
