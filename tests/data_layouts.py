"""Tiny copies of the official dataset layouts (docs/datasets.md), written by the tests themselves.

Each builder writes a few classes of 8×8 JPEGs whose colour encodes (class, image), plus a macOS
``._*`` resource-fork file beside the images, and returns the folder the archive extracts to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, value: int) -> None:
    """An 8×8 JPEG of a flat colour derived from ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((37 * value) % 256, (91 * value) % 256, (13 * value) % 256)
    Image.new("RGB", (8, 8), colour).save(path, "JPEG")


def write_resource_fork(folder: Path, name: str) -> None:
    """A macOS ``._name`` file: not an image, and never to be read as one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"._{name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")


def make_cub(parent: Path, classes: int = 4, per_class: int = 3) -> Path:
    root = parent / "CUB_200_2011"
    images, labels, names = [], [], []
    for cid in range(1, classes + 1):
        folder = f"{cid:03d}.Bird_{cid}"
        names.append(f"{cid} {folder}")
        for k in range(per_class):
            image_id = len(images) + 1
            rel = f"{folder}/Bird_{cid}_{k:04d}.jpg"
            write_image(root / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
        write_resource_fork(root / "images" / folder, f"Bird_{cid}_0000.jpg")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def make_cars(parent: Path, classes: int = 4, per_class: int = 3) -> Path:
    from scipy.io import savemat

    root = parent / "cars196"
    n = classes * per_class
    annotations = np.zeros(
        (1, n),
        dtype=[
            (field, object)
            for field in (
                "relative_im_path",
                "bbox_x1",
                "bbox_y1",
                "bbox_x2",
                "bbox_y2",
                "class",
                "test",
            )
        ],
    )
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / rel, i)
        annotations[0, i] = (rel, 1, 1, 7, 7, i // per_class + 1, i % 2)
    class_names = np.array([f"Make Model {c}" for c in range(1, classes + 1)], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    write_resource_fork(root / "car_ims", "000001.jpg")
    return root


def make_sop(
    parent: Path, train_classes: int = 3, test_classes: int = 3, per_class: int = 2
) -> Path:
    root = parent / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    image_id = 0
    for split, first, count in (
        ("train", 1, train_classes),
        ("test", train_classes + 1, test_classes),
    ):
        rows = [header]
        for cid in range(first, first + count):
            for k in range(per_class):
                image_id += 1
                rel = f"mug_final/{100000 + cid}_{k}.JPG"
                write_image(root / rel, image_id)
                rows.append(f"{image_id} {cid} 8 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    write_resource_fork(root / "mug_final", "100001_0.JPG")
    return root


def make_inshop(parent: Path) -> Path:
    """Items 1–3 train; item 4 has gallery images only, items 5 and 6 query and gallery images."""
    root = parent / "In-shop Clothes Retrieval Benchmark"
    rows = []
    for item in range(1, 7):
        statuses = (
            ["train"] * 3
            if item <= 3
            else ["gallery"] * 3
            if item == 4
            else ["query", "gallery", "gallery"]
        )
        for k, status in enumerate(statuses):
            name = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_1_front.jpg"
            write_image(root / "Img" / name, 10 * item + k)
            rows.append(f"{name}  id_{item:08d}  {status}")
    write_resource_fork(
        root / "Img" / "img" / "WOMEN" / "Dresses" / "id_00000001", "01_1_front.jpg"
    )
    partition = root / "Eval" / "list_eval_partition.txt"
    partition.parent.mkdir(parents=True)
    partition.write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def make_folder(root: Path, names=("ant", "bee", "cat", "dog"), per_class: int = 3) -> Path:
    for c, name in enumerate(names):
        for k in range(per_class):
            write_image(root / name / f"{k}.jpg", 10 * c + k)
        write_resource_fork(root / name, "0.jpg")
    return root
