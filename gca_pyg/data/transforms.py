"""The standard image transforms (docs/method.md, "Backbone and embedding") and their tensor
counterparts for the demo set."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """``PIL.Image`` -> normalised tensor: RandomResizedCrop(size, scale) + horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(),
        ]
    )


def test_transform(resize: int = 256, crop: int = 224) -> v2.Compose:
    """``PIL.Image`` -> normalised tensor: Resize(resize) (shorter side) + CenterCrop(crop)."""
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(crop),
            *_to_normalised_tensor(),
        ]
    )


# Its name starts with "test_": tell pytest it is not a test when a test module imports it.
test_transform.__test__ = False


class RandomCropFlip(torch.nn.Module):
    """Random crop of ``size`` after reflect-padding by ``padding``, then a horizontal flip with
    probability 1/2, drawn independently for every image of a batch ``(B, C, H, W)`` (or for one
    image ``(C, H, W)``) in a few tensor operations."""

    def __init__(self, size: int, padding: int):
        super().__init__()
        self.size, self.padding = size, padding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        count, channels, height, width = batch.shape
        padded = torch.nn.functional.pad(batch, [self.padding] * 4, mode="reflect")
        span = torch.arange(self.size, device=images.device)
        top = torch.randint(0, height + 2 * self.padding - self.size + 1, (count, 1))
        left = torch.randint(0, width + 2 * self.padding - self.size + 1, (count, 1))
        rows, columns = top + span, left + span  # (B, size) each
        flip = torch.rand(count, 1) < 0.5
        columns = torch.where(flip, columns.flip(1), columns)
        crops = padded[
            torch.arange(count)[:, None, None, None],
            torch.arange(channels)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
        return crops[0] if images.dim() == 3 else crops


class _DemoTransform(v2.Compose):
    """A demo transform that acts per image on a whole batch, so DemoDataset can apply it once per
    batch (see :meth:`gca_pyg.data.DemoDataset.__getitems__`)."""

    batched = True


def demo_train_transform(size: int = 32, padding: int = 4) -> v2.Compose:
    """Float image tensor(s) in [0, 1] -> normalised: random crop of ``size`` after reflect-padding
    by ``padding``, horizontal flip (the demo classes are defined flip-invariantly); one image
    ``(3, H, W)`` or a batch ``(B, 3, H, W)`` with independent draws per image."""
    return _DemoTransform(
        [RandomCropFlip(size, padding), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def demo_test_transform() -> v2.Compose:
    """Float image tensor(s) in [0, 1] -> normalised."""
    return _DemoTransform([v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _to_normalised_tensor() -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
