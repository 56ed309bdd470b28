"""The embedded demo dataset: procedurally generated fine-grained classes, no download needed.

How the classes are made
------------------------
Every image shows one object on a cluttered background. A class is a combination of five discrete
factors, and nothing else:

* **shape** of the body — disc, square, triangle, hexagon, cross, ring (a disc and a hexagon of
  six pixels' radius differ in a few edge pixels);
* **hue** of the body — red, amber, green, azure, violet;
* **texture** on the body — plain, horizontal stripes, vertical stripes, checks, dots (a ±30%
  brightness pattern with a period of about four pixels);
* **mark layout** — small marks beside the body at its top, its bottom, on both sides, or one on
  its centre;
* **mark tone** — white, black or gold.

That makes 6 × 5 × 5 × 4 × 3 = 1,800 possible classes; ``num_classes`` of them are drawn at random
(seeded), the first half of the draw trains and the second half tests. The classes differ only in
these combinations: most share four of their five factors with another class (185 of the default
200 do), and the test classes are new combinations of factor values that training has seen, so
telling them apart needs features of each factor, not a memory of the training classes.

Shared by all classes, varying from image to image: the object's position (±8% of the image),
scale (0.85–1.12), rotation (±20°, turning its texture and marks with it) and texture phase; the
body's colour (hue with Gaussian jitter of 0.02, saturation 0.5–0.9, value 0.55–0.95) and the
marks' (saturation and value jitter); a background of random low-saturation colour with a random
linear gradient; clutter of three thin lines and two small blobs in random colours (any hue, dark
or light, so neither the image's colours nor a stray dot give the class away); image-wide
brightness and contrast jitter; and Gaussian pixel noise (σ = 0.035). Every factor is symmetric
under a horizontal flip, so flipping is a valid augmentation.

Images are rendered with vectorised numpy — anti-aliased signed-distance shapes over blocks of
500 images, one pass per vocabulary entry, never a loop over pixels — from generators seeded by
``(seed, block)``: a fixed seed gives byte-identical arrays on a given platform. They are cached
as one compressed ``.npz`` file named by the generator version and parameters under
:func:`default_cache_dir`, written atomically; an unreadable cache file is regenerated.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gca_pyg.data.base import RetrievalDataset, check_split
from gca_pyg.errors import DatasetLayoutError

#: Bump when the images change, so that old cache files are not reused.
GENERATOR_VERSION = 1

SHAPES = ("disc", "square", "triangle", "hexagon", "cross", "ring")
BODY_HUES = {"red": 0.0, "amber": 0.1, "green": 0.3, "azure": 0.55, "violet": 0.75}
TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots")
MARK_LAYOUTS = ("top", "bottom", "sides", "centre")
MARK_TONES = {"white": (0.0, 0.0, 0.95), "black": (0.0, 0.0, 0.08), "gold": (0.13, 0.85, 0.9)}
FACTORS = (SHAPES, tuple(BODY_HUES), TEXTURES, MARK_LAYOUTS, tuple(MARK_TONES))

# Geometry in the object's frame, where the body has radius 1.
MARK_OFFSET, MARK_RADIUS = 1.45, 0.33
# Two mark centres per layout (a single mark is listed twice).
MARK_CENTRES = np.array(
    [
        [(0, -MARK_OFFSET)] * 2,
        [(0, MARK_OFFSET)] * 2,
        [(-MARK_OFFSET, 0), (MARK_OFFSET, 0)],
        [(0, 0)] * 2,
    ],
    dtype=np.float32,
)
TEXTURE_PERIOD, TEXTURE_CONTRAST = 0.6, 0.3
CLUTTER_LINES, CLUTTER_BLOBS = 3, 2
NOISE_STD = 0.035
RENDER_BLOCK = 500


def default_cache_dir() -> Path:
    """``$GCA_PYG_CACHE``, else ``$XDG_CACHE_HOME/gca_pyg``, else ``~/.cache/gca_pyg``."""
    if os.environ.get("GCA_PYG_CACHE"):
        return Path(os.environ["GCA_PYG_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gca_pyg"


class DemoDataset(RetrievalDataset):
    """The demo set: ``num_classes`` generated fine-grained classes, half train, half test.

    Items are ``(image, label)`` with ``image`` a float tensor ``(3, image_size, image_size)`` in
    [0, 1] (see the module docstring for how the classes are made). The arrays are generated on
    first use (a few seconds) and cached.

    Args:
        split: ``"train"`` (the first half of the classes) or ``"test"`` (the second half).
        transform: applied to each image tensor, e.g. :func:`~gca_pyg.data.demo_train_transform`.
        cache_dir: where the cache file lives (default :func:`default_cache_dir`).
        num_classes: classes in both splits together (even, at most 1,800).
        images_per_class: images of every class.
        image_size: the images' height and width in pixels.
        seed: the generator's seed.
    """

    def __init__(
        self,
        split: str = "train",
        transform: Optional[Callable] = None,
        cache_dir=None,
        *,
        num_classes: int = 200,
        images_per_class: int = 30,
        image_size: int = 32,
        seed: int = 0,
    ):
        check_split(split, ("train", "test"))
        images, labels, factors = load_demo(
            cache_dir,
            num_classes=num_classes,
            images_per_class=images_per_class,
            image_size=image_size,
            seed=seed,
        )
        half = num_classes // 2
        first = 0 if split == "train" else half
        items = slice(first * images_per_class, (first + half) * images_per_class)
        #: Each class's index into every vocabulary of :data:`FACTORS`, ``(C, 5)``.
        self.factors = torch.from_numpy(factors[first : first + half])
        names = [
            "-".join(vocabulary[i] for vocabulary, i in zip(FACTORS, row))
            for row in self.factors.tolist()
        ]
        super().__init__(labels[items] - first, names, transform)
        self.images = torch.from_numpy(images[items])
        self.split = split

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader calls this when it exists): a transform marked
        ``batched``, like the demo transforms, runs once on the batch instead of once per image."""
        if not getattr(self.transform, "batched", False):
            return [self[index] for index in indices]
        images = self.transform(self.images[indices].float().div_(255))
        return list(zip(images, self.labels[indices].tolist()))


def write_demo_images(out_dir, split: str = "test", cache_dir=None, **params) -> int:
    """Writes a split of the demo set as PNG files, ``out_dir/<class name>/<n>.png``: the layout
    that ``python -m gca_pyg.index CHECKPOINT --images DIR --label-folders`` and the ``folder``
    data set read. ``params`` are those of :class:`DemoDataset`. Returns the number of images.

    Raises:
        DatasetLayoutError: If `out_dir` exists and is not an empty folder (nothing is
            overwritten).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetLayoutError(
            f"{out_dir} exists and is not an empty folder; name a new folder for the demo images"
        )
    dataset = DemoDataset(split, cache_dir=cache_dir, **params)
    pixels = dataset.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    counts = np.zeros(len(dataset.classes), dtype=int)
    for image, label in zip(pixels, dataset.labels.tolist()):
        folder = out_dir / dataset.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{counts[label]:03d}.png")
        counts[label] += 1
    return len(dataset)


def load_demo(cache_dir=None, **params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The demo arrays ``(images, labels, factors)`` from the cache, generated and cached if absent
    or unreadable. ``params`` are those of :func:`generate_demo`."""
    path = Path(cache_dir or default_cache_dir()) / _cache_name(**params)
    expected = _array_shapes(**params)
    try:
        with np.load(path) as archive:
            arrays = tuple(archive[key] for key in ("images", "labels", "factors"))
        if tuple(a.shape for a in arrays) == expected:
            return arrays
        problem = "its arrays have the wrong shapes"
    except (FileNotFoundError, NotADirectoryError):
        problem = None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        warnings.warn(
            f"demo cache {path} is unreadable ({problem}); regenerating it",
            RuntimeWarning,
            stacklevel=2,
        )
    arrays = generate_demo(**params)
    try:
        _save_atomically(path, dict(zip(("images", "labels", "factors"), arrays)))
    except OSError as error:
        warnings.warn(
            f"could not cache the demo set at {path} ({error}); it will be generated "
            f"again next time: set GCA_PYG_CACHE to a writable folder",
            RuntimeWarning,
            stacklevel=2,
        )
    return arrays


def _array_shapes(
    num_classes: int = 200, images_per_class: int = 30, image_size: int = 32, seed: int = 0
) -> tuple[tuple, tuple, tuple]:
    """The shapes of :func:`generate_demo`'s arrays, once its parameters are checked."""
    combinations = int(np.prod([len(vocabulary) for vocabulary in FACTORS]))
    if num_classes % 2 or not 2 <= num_classes <= combinations:
        raise ValueError(f"num_classes must be even and in 2..{combinations}, not {num_classes}")
    if images_per_class < 1 or image_size < 8:
        raise ValueError(
            f"need images_per_class >= 1 and image_size >= 8, not "
            f"{images_per_class} and {image_size}"
        )
    n = num_classes * images_per_class
    return (n, 3, image_size, image_size), (n,), (num_classes, len(FACTORS))


def generate_demo(
    num_classes: int = 200, images_per_class: int = 30, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the demo set (see the module docstring).

    Returns:
        ``images`` uint8 ``(N, 3, S, S)``, ``labels`` int64 ``(N,)`` (class ``c`` holds items
        ``c*images_per_class`` to ``(c+1)*images_per_class - 1``) and ``factors`` int64
        ``(num_classes, 5)``, each class's index into :data:`FACTORS`.
    """
    shapes = _array_shapes(num_classes, images_per_class, image_size, seed)
    sizes = [len(vocabulary) for vocabulary in FACTORS]
    drawn = np.random.default_rng(seed).choice(np.prod(sizes), num_classes, replace=False)
    factors = np.stack(np.unravel_index(drawn, sizes), axis=1).astype(np.int64)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    images = np.empty(shapes[0], dtype=np.uint8)
    # Rendering in blocks with a generator per block keeps the temporaries small (and reused).
    for block, start in enumerate(range(0, len(labels), RENDER_BLOCK)):
        stop = start + RENDER_BLOCK
        images[start:stop] = _render(
            factors[labels[start:stop]], image_size, np.random.default_rng([seed, block])
        )
    return images, labels, factors


def _render(factors: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Images ``(n, 3, size, size)`` uint8 of the classes with ``factors`` ``(n, 5)``, one each."""
    shape, hue, texture, layout, tone = factors.T
    n = len(factors)
    pixel = np.arange(size, dtype=np.float32) + 0.5
    x, y = pixel[None, None, :], pixel[None, :, None]

    canvas = _background(rng, n, x, y, size)
    for _ in range(CLUTTER_LINES):
        px, py, angle = (
            _col(rng.uniform(0, size, n)),
            _col(rng.uniform(0, size, n)),
            rng.uniform(0, np.pi, n),
        )
        distance = np.abs((x - px) * _col(np.sin(angle)) - (y - py) * _col(np.cos(angle)))
        half_width = _col(rng.uniform(0.3, 0.7, n))
        _paint(canvas, _coverage(distance - half_width), _random_colours(rng, n))
    for _ in range(CLUTTER_BLOBS):
        distance = np.hypot(x - _col(rng.uniform(0, size, n)), y - _col(rng.uniform(0, size, n)))
        blob_radius = _col(rng.uniform(1.0, 2.5, n))
        _paint(canvas, _coverage(distance - blob_radius), _random_colours(rng, n))

    # The object's frame: body radius 1, rotated by up to 20 degrees, placed near the centre.
    radius = _col(0.2 * size * rng.uniform(0.85, 1.12, n))
    angle = np.deg2rad(rng.uniform(-20, 20, n))
    dx = x - _col(size / 2 + rng.uniform(-0.08, 0.08, n) * size)
    dy = y - _col(size / 2 + rng.uniform(-0.08, 0.08, n) * size)
    cos, sin = _col(np.cos(angle)), _col(np.sin(angle))
    u, v = (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius

    body_hue = np.array(list(BODY_HUES.values()))[hue] + rng.normal(0, 0.02, n)
    body = _hsv_to_rgb(body_hue, rng.uniform(0.5, 0.9, n), rng.uniform(0.55, 0.95, n))
    pattern = _texture(texture, u, v, rng.uniform(0, 1, (2, n)), rng.uniform(0.9, 1.1, n))
    _paint(
        canvas,
        _coverage(_shape_distance(shape, u, v) * radius),
        body[:, :, None, None] * (1 + TEXTURE_CONTRAST * pattern[:, None]),
    )

    centres = MARK_CENTRES[layout]
    mark_distance = np.minimum(
        *(np.hypot(u - _col(centres[:, k, 0]), v - _col(centres[:, k, 1])) for k in range(2))
    )
    tones = np.array(list(MARK_TONES.values()))[tone]
    marks = _hsv_to_rgb(
        tones[:, 0],
        tones[:, 1] * rng.uniform(0.85, 1, n),
        np.clip(tones[:, 2] + rng.normal(0, 0.04, n), 0, 1),
    )
    _paint(canvas, _coverage((mark_distance - MARK_RADIUS) * radius), marks)

    canvas -= 0.5
    canvas *= rng.uniform(0.85, 1.15, (n, 1, 1, 1)).astype(np.float32)  # contrast
    canvas += 0.5 + rng.uniform(-0.06, 0.06, (n, 1, 1, 1)).astype(np.float32)  # brightness
    canvas += NOISE_STD * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.rint(np.clip(canvas, 0, 1, out=canvas) * 255).astype(np.uint8)


def _col(values) -> np.ndarray:
    """Per-image values ``(n,)`` as ``(n, 1, 1)`` float32, to broadcast over pixels."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a pixel by a shape at signed ``distance`` (pixels, < 0 inside)."""
    return np.clip(0.5 - distance, 0, 1)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Blend ``colour`` (``(n, 3)`` or per pixel) over ``canvas`` with ``alpha`` ``(n, S, S)``."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    canvas += alpha[:, None] * (colour - canvas)


def _hsv_to_rgb(hue, saturation, value) -> np.ndarray:
    """``(n,)`` HSV in [0, 1] (hue wraps around) -> ``(n, 3)`` RGB."""
    k = (np.array([5.0, 3.0, 1.0]) + np.asarray(hue)[:, None] * 6) % 6
    value, saturation = np.asarray(value)[:, None], np.asarray(saturation)[:, None]
    return (value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.1, 0.9, n), rng.uniform(0.15, 0.95, n))


def _background(rng: np.random.Generator, n: int, x, y, size: int) -> np.ndarray:
    """Random low-saturation colours with a random linear gradient, ``(n, 3, S, S)``."""
    base = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.3, n), rng.uniform(0.25, 0.75, n))
    direction = rng.uniform(0, 2 * np.pi, n)
    ramp = (x - size / 2) * _col(np.cos(direction)) + (y - size / 2) * _col(np.sin(direction))
    gradient = _col(rng.uniform(0, 0.25, n)) * ramp / size
    return base[:, :, None, None] + gradient[:, None]


# Signed distance (body radii, < 0 inside) to each shape, in the object's frame.
_SHAPE_DISTANCE = {
    "disc": lambda u, v: np.hypot(u, v) - 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.85,
    "triangle": lambda u, v: np.maximum(v, 0.866 * np.abs(u) - 0.5 * v) - 0.55,
    "hexagon": lambda u, v: (
        np.maximum.reduce([np.abs(u), np.abs(0.5 * u + 0.866 * v), np.abs(0.5 * u - 0.866 * v)])
        - 0.92
    ),
    "cross": lambda u, v: np.minimum(
        np.maximum(np.abs(u) - 0.36, np.abs(v) - 1), np.maximum(np.abs(u) - 1, np.abs(v) - 0.36)
    ),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.28,
}

# Each texture in [-1, 1] from the phases of a horizontal and a vertical wave.
_TEXTURE = {
    "plain": lambda wave_u, wave_v: np.zeros_like(wave_u),
    "hstripes": lambda wave_u, wave_v: np.sin(wave_v),
    "vstripes": lambda wave_u, wave_v: np.sin(wave_u),
    "checks": lambda wave_u, wave_v: np.sin(wave_u) * np.sin(wave_v),
    "dots": lambda wave_u, wave_v: (np.cos(wave_u) + np.cos(wave_v)) / 2,
}


def _shape_distance(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (body radii) of every pixel to its image's body ``SHAPES[shape]``."""
    return _per_entry(shape, SHAPES, _SHAPE_DISTANCE, u, v)


def _texture(texture: np.ndarray, u, v, phase: np.ndarray, period_scale: np.ndarray) -> np.ndarray:
    """Each image's texture ``TEXTURES[texture]`` in [-1, 1] over the object's frame, sharpened."""
    period = TEXTURE_PERIOD * _col(period_scale)
    wave_u = 2 * np.pi * (u / period + _col(phase[0]))
    wave_v = 2 * np.pi * (v / period + _col(phase[1]))
    return np.tanh(2.5 * _per_entry(texture, TEXTURES, _TEXTURE, wave_u, wave_v)) / np.tanh(2.5)


def _per_entry(which: np.ndarray, vocabulary, functions: dict, *arrays) -> np.ndarray:
    """``functions[vocabulary[which[i]]](*arrays[i])`` for every image ``i``, one pass per entry."""
    out = np.empty(arrays[0].shape, dtype=np.float32)
    for entry, name in enumerate(vocabulary):
        chosen = which == entry
        out[chosen] = functions[name](*(array[chosen] for array in arrays))
    return out


def _cache_name(
    num_classes: int = 200, images_per_class: int = 30, image_size: int = 32, seed: int = 0
) -> str:
    return (
        f"demo-v{GENERATOR_VERSION}-c{num_classes}-n{images_per_class}-s{image_size}-seed{seed}.npz"
    )


def _save_atomically(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as a compressed ``.npz`` to a temporary file, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
