"""Tiny galleries and checkpoints for the retrieval tests: a few PNGs per class and an untrained
small-CNN GCA-HNG saved as a training checkpoint (no training needed to embed and search)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gca_pyg.checkpoint import save_checkpoint
from gca_pyg.config import load_config
from gca_pyg.model import build_model

# The folder recipe on 32×32 images with the small CNN and a 16-d embedding.
SETTINGS = [
    "data.image_size=32",
    "data.resize=36",
    "data.num_workers=0",
    "model.backbone=small_cnn",
    "model.pretrained=none",
    "model.frozen_bn=false",
    "model.embedding_size=16",
    "net.heads=1",
    "net.num_layers=1",
    "eval.batch_size=8",
]


def write_gallery(root: Path, classes: int = 3, per_class: int = 4, seed: int = 0) -> Path:
    """`classes` folders of `per_class` PNGs (40×36 RGB noise around a colour per class)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, size=(36, 40, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def make_checkpoint(path: Path, seed: int = 0, extra=()) -> Path:
    """An untrained model of the shrunk folder recipe, saved as ``python -m gca_pyg.train``
    saves one (config, weights, class names, epoch)."""
    config = load_config("folder", [*SETTINGS, *extra])
    torch.manual_seed(seed)
    model = build_model(config, num_classes=4, device=torch.device("cpu"), pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {
            "config": config.to_dict(),
            "model": model.state_dict(),
            "classes": [f"train{c}" for c in range(4)],
            "training": {"epoch": 1},
        },
        path,
    )
    return path
