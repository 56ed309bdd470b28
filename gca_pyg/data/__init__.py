"""Datasets, transforms and the class-balanced batch sampler.

Every dataset is one split of class-disjoint data with ``labels`` (contiguous ``0..C-1``),
``classes``, ``len`` and ``dataset[i] -> (image, label)``, and reports images that failed to decode
through ``unreadable_count`` / ``check_unreadable()``; see :mod:`gca_pyg.data.base`.
"""

from __future__ import annotations

from typing import Callable, Optional

from gca_pyg.data.base import DECODE_ERRORS, ImageFileDataset, RetrievalDataset, open_rgb
from gca_pyg.data.cars import Cars196
from gca_pyg.data.cub import CUB200
from gca_pyg.data.demo import DemoDataset, default_cache_dir, generate_demo
from gca_pyg.data.folder import IMAGE_EXTENSIONS, ImageFolderByClass, find_images
from gca_pyg.data.inshop import InShop
from gca_pyg.data.official import OfficialDataset
from gca_pyg.data.sampler import CLASS_SAMPLING, ClassBalancedBatchSampler
from gca_pyg.data.sop import StanfordOnlineProducts
from gca_pyg.data.transforms import (
    demo_test_transform,
    demo_train_transform,
    test_transform,
    train_transform,
)
from gca_pyg.errors import ConfigError

DATASETS = {
    "cub": CUB200,
    "cars": Cars196,
    "sop": StanfordOnlineProducts,
    "inshop": InShop,
    "folder": ImageFolderByClass,
    "demo": DemoDataset,
}


def get_dataset(
    name: str, root=None, split: str = "train", transform: Optional[Callable] = None, **options
) -> RetrievalDataset:
    """The ``split`` of dataset ``name`` (a key of :data:`DATASETS`) read from ``root``.

    For ``"demo"``, ``root`` is the cache folder (default: :func:`default_cache_dir`). ``options``
    go to the dataset's class, e.g. ``verify_counts=False`` or ``num_classes=100``.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "demo":
        return DemoDataset(split, transform, cache_dir=root, **options)
    return DATASETS[name](root, split, transform, **options)


__all__ = [
    "CLASS_SAMPLING",
    "DECODE_ERRORS",
    "IMAGE_EXTENSIONS",
    "CUB200",
    "Cars196",
    "ClassBalancedBatchSampler",
    "DATASETS",
    "DemoDataset",
    "ImageFileDataset",
    "ImageFolderByClass",
    "InShop",
    "OfficialDataset",
    "RetrievalDataset",
    "StanfordOnlineProducts",
    "default_cache_dir",
    "demo_test_transform",
    "demo_train_transform",
    "find_images",
    "generate_demo",
    "get_dataset",
    "open_rgb",
    "test_transform",
    "train_transform",
]
