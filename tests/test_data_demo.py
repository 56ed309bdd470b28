"""The embedded demo set: deterministic, class-disjoint, fine-grained, cached, fast to make."""

import numpy as np
import pytest
import torch

from gca_pyg.data import (
    DemoDataset,
    default_cache_dir,
    demo_test_transform,
    demo_train_transform,
    get_dataset,
)
from gca_pyg.data import demo as demo_module
from gca_pyg.errors import DatasetLayoutError

SMALL = {"num_classes": 20, "images_per_class": 4}


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory):
    """The default-size demo set generated once into a fresh cache, with the number of images
    each call of the renderer drew."""
    cache = tmp_path_factory.mktemp("demo-cache")
    rendered = []
    render = demo_module._render

    def counting_render(factors, size, rng):
        rendered.append(len(factors))
        return render(factors, size, rng)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "_render", counting_render)
        DemoDataset("train", cache_dir=cache)
    return cache, rendered


def test_generation_renders_whole_blocks_and_caches_one_file(full_cache):
    cache, rendered = full_cache
    # 6,000 images (200 classes × 30) in vectorised blocks of 500, not image by image.
    assert rendered == [500] * 12
    (path,) = cache.iterdir()
    assert path.name == f"demo-v{demo_module.GENERATOR_VERSION}-c200-n30-s32-seed0.npz"
    assert path.stat().st_size < 20e6


def test_splits_hold_disjoint_halves_of_the_classes(full_cache):
    cache, _ = full_cache
    train, test = DemoDataset("train", cache_dir=cache), DemoDataset("test", cache_dir=cache)
    assert len(train) == len(test) == 100 * 30
    assert train.num_classes == test.num_classes == 100
    assert not set(train.classes) & set(test.classes)
    for ds in (train, test):
        assert torch.equal(ds.labels, torch.arange(100).repeat_interleave(30))
    # The test classes are new combinations of factor values that training has seen.
    for factor in range(5):
        assert set(test.factors[:, factor].tolist()) <= set(train.factors[:, factor].tolist())


def test_classes_are_fine_grained(full_cache):
    cache, _ = full_cache
    factors = DemoDataset("test", cache_dir=cache).factors
    differing = (factors[:, None] != factors[None]).sum(-1)
    differing.fill_diagonal_(5)
    # Most test classes have another test class that differs in a single factor.
    assert (differing.min(1).values == 1).float().mean() > 0.5


def test_images_vary_within_a_class_more_than_the_mean_differs_between_classes(full_cache):
    cache, _ = full_cache
    images = DemoDataset("train", cache_dir=cache).images.float().view(100, 30, -1)
    within = images.std(1).mean()
    between = images.mean(1).std(0).mean()
    assert within > between  # classes are not separable by their average picture


def test_items_are_float_images_and_transforms_apply(full_cache):
    cache, _ = full_cache
    image, label = DemoDataset("test", cache_dir=cache)[31]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and label == 1
    assert 0 <= image.min() and image.max() <= 1
    augmented, _ = DemoDataset("train", demo_train_transform(), cache)[0]
    normalised, _ = get_dataset("demo", cache, "train", demo_test_transform())[0]
    raw, _ = DemoDataset("train", cache_dir=cache)[0]
    assert augmented.shape == normalised.shape == (3, 32, 32)
    expected = (raw - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    assert torch.allclose(normalised, expected)


def test_generation_is_deterministic(tmp_path):
    blocks = {"num_classes": 40, "images_per_class": 30}  # 1,200 images: several render blocks
    first = DemoDataset("test", cache_dir=tmp_path / "a", **blocks)
    again = DemoDataset("test", cache_dir=tmp_path / "b", **blocks)  # regenerated from scratch
    assert again.images.numpy().tobytes() == first.images.numpy().tobytes()
    assert again.classes == first.classes
    other_seed = demo_module.generate_demo(**SMALL, seed=1)[0]
    assert not np.array_equal(demo_module.generate_demo(**SMALL)[0], other_seed)


def test_cache_is_reused(tmp_path, monkeypatch):
    DemoDataset(cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.iterdir()
    written = path.stat().st_mtime_ns

    def fail(**_):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(demo_module, "generate_demo", fail)
    assert len(DemoDataset("test", cache_dir=tmp_path, **SMALL)) == 10 * 4
    assert path.stat().st_mtime_ns == written


@pytest.mark.parametrize("damage", [b"not a zip file", None])
def test_corrupt_cache_is_regenerated(tmp_path, damage):
    expected = DemoDataset(cache_dir=tmp_path, **SMALL).images
    (path,) = tmp_path.iterdir()
    content = path.read_bytes()
    path.write_bytes(damage if damage is not None else content[: len(content) // 2])
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        regenerated = DemoDataset(cache_dir=tmp_path, **SMALL)
    assert torch.equal(regenerated.images, expected)
    assert path.read_bytes() != (damage or content[: len(content) // 2])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_unwritable_cache_still_gives_the_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not cache the demo set"):
        dataset = DemoDataset(cache_dir=blocker / "cache", **SMALL)
    assert len(dataset) == 40


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GCA_PYG_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "gca_pyg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gca_pyg"
    monkeypatch.setenv("GCA_PYG_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    DemoDataset(**SMALL)
    assert len(list((tmp_path / "mine").iterdir())) == 1


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="num_classes must be even"):
        DemoDataset(num_classes=21)
    with pytest.raises(ValueError, match="split must be one of"):
        DemoDataset("query")


def test_batched_demo_transform_draws_per_image_and_matches_single_items(tmp_path):
    from gca_pyg.data.transforms import RandomCropFlip

    images = torch.rand(64, 3, 32, 32)
    torch.manual_seed(0)
    crops = RandomCropFlip(32, 4)(images)
    assert crops.shape == images.shape
    # Independent draws: some images are cropped or flipped differently from others.
    unchanged = (crops == images).flatten(1).all(1)
    assert 0 < int(unchanged.sum()) < 64
    # Every output is a crop of the reflect-padded image, possibly flipped.
    padded = torch.nn.functional.pad(images, [4] * 4, mode="reflect")
    for b in range(8):
        windows = padded[b].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
        candidates = torch.cat([windows, windows.flip(-1)], dim=1)
        assert (candidates == crops[b][:, None, None]).flatten(3).all(-1).all(0).any()

    dataset = DemoDataset("train", demo_test_transform(), tmp_path)
    batch = dataset.__getitems__([0, 5, 7])
    for (image, label), index in zip(batch, [0, 5, 7]):
        expected_image, expected_label = dataset[index]
        assert torch.allclose(image, expected_image) and label == expected_label


def test_demo_images_are_written_as_class_folders_of_pngs(tmp_path):
    from PIL import Image

    from gca_pyg.data.demo import write_demo_images

    out = tmp_path / "images"
    assert write_demo_images(out, "test", cache_dir=tmp_path / "cache", **SMALL) == 40
    dataset = DemoDataset("test", cache_dir=tmp_path / "cache", **SMALL)
    assert sorted(path.name for path in out.iterdir()) == sorted(dataset.classes)
    first = dataset.classes[int(dataset.labels[0])]
    saved = np.asarray(Image.open(out / first / "000.png"))
    assert np.array_equal(saved, dataset.images[0].permute(1, 2, 0).numpy())  # lossless
    assert sum(1 for _ in out.rglob("*.png")) == 40
    with pytest.raises(DatasetLayoutError, match="is not an empty folder"):
        write_demo_images(out, "test", cache_dir=tmp_path / "cache", **SMALL)


def test_the_demo_images_command(full_cache, tmp_path, monkeypatch, capsys):
    from gca_pyg.data.__main__ import main

    monkeypatch.setenv("GCA_PYG_CACHE", str(full_cache[0]))
    assert main(["demo-images", str(tmp_path / "demo"), "--split", "train"]) == 0
    assert "wrote 3,000 demo images (train split)" in capsys.readouterr().out
    assert len(list((tmp_path / "demo").iterdir())) == 100
    assert main(["demo-images", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
