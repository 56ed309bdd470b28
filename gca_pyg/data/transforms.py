"""The standard image transforms (SPEC.md §6) and their tensor counterparts for the demo set."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """``PIL.Image`` -> normalised tensor: RandomResizedCrop(size, scale) + horizontal flip."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        *_to_normalised_tensor(),
    ])


def test_transform(resize: int = 256, crop: int = 224) -> v2.Compose:
    """``PIL.Image`` -> normalised tensor: Resize(resize) (shorter side) + CenterCrop(crop)."""
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        *_to_normalised_tensor(),
    ])


# Its name starts with "test_": tell pytest it is not a test when a test module imports it.
test_transform.__test__ = False


def demo_train_transform(size: int = 32, padding: int = 4) -> v2.Compose:
    """Float image tensor in [0, 1] -> normalised: random crop of ``size`` after reflect-padding
    by ``padding``, horizontal flip (the demo classes are defined flip-invariantly)."""
    return v2.Compose([
        v2.RandomCrop(size, padding=padding, padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def demo_test_transform() -> v2.Normalize:
    """Float image tensor in [0, 1] -> normalised."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def _to_normalised_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
