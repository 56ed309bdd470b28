"""Unreadable images: replaced by a class-mate, counted across DataLoader workers, capped at 1%."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from gca_pyg.data import ImageFolderByClass
from gca_pyg.errors import UnreadableImagesError
from tests.data_layouts import make_folder


def to_tensor(image):
    return torch.tensor(image.getpixel((4, 4)))


def folder_with_broken(tmp_path, broken: int, per_class: int = 50):
    """Train split: classes ant, bee (``per_class`` images each); ant's ``1.jpg`` .. are corrupt."""
    make_folder(tmp_path, names=("ant", "bee", "cat", "dog"), per_class=per_class)
    for k in range(broken):
        (tmp_path / "ant" / f"{k + 1}.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return ImageFolderByClass(tmp_path, "train", transform=to_tensor)


def index_of(dataset, path) -> int:
    return dataset.paths.index(str(path))


def test_unreadable_image_is_replaced_by_its_class_mate_and_warned_once(tmp_path):
    dataset = folder_with_broken(tmp_path, broken=1)  # 1 of 100: within 1%
    broken = index_of(dataset, tmp_path / "ant" / "1.jpg")
    with pytest.warns(RuntimeWarning, match=r"unreadable image .*ant/1\.jpg"):
        image, label = dataset[broken]
    assert label == 0
    assert torch.equal(image, dataset[broken + 1][0])  # the next image of the same class
    assert not torch.equal(image, dataset[broken - 1][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[broken]
    assert dataset.unreadable_count == 1
    assert dataset.unreadable_paths == [str(tmp_path / "ant" / "1.jpg")]


def test_substitute_wraps_around_the_class(tmp_path):
    dataset = folder_with_broken(tmp_path, broken=0)
    (tmp_path / "ant" / "9.jpg").write_bytes(b"")  # ant's last image in name order
    with pytest.warns(RuntimeWarning, match="ant/9.jpg"):
        image, label = dataset[index_of(dataset, tmp_path / "ant" / "9.jpg")]
    assert label == 0 and torch.equal(image, dataset[0][0])


def test_more_than_one_percent_unreadable_stops(tmp_path):
    dataset = folder_with_broken(tmp_path, broken=2)  # 2 of 100
    with pytest.warns(RuntimeWarning):
        dataset[index_of(dataset, tmp_path / "ant" / "1.jpg")]
        with pytest.raises(UnreadableImagesError, match=r"2 of 100 images could not be decoded"):
            dataset[index_of(dataset, tmp_path / "ant" / "2.jpg")]


def test_a_class_without_any_readable_image_stops(tmp_path):
    make_folder(tmp_path, names=("ant", "bee", "cat", "dog"), per_class=100)
    for k in range(1, 100):
        (tmp_path / "ant" / f"{k}.jpg").unlink()
    (tmp_path / "ant" / "0.jpg").write_bytes(b"")
    dataset = ImageFolderByClass(tmp_path, "train")  # 1 of 101 broken: within 1%
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(UnreadableImagesError, match="no image of class 'ant'"),
    ):
        dataset[0]


def test_failures_in_dataloader_workers_reach_the_main_process(tmp_path):
    # Forked workers share nothing they write unless it is in shared memory. (Spawned workers
    # receive the flags through torch's pickling, which always shares a tensor's memory.)
    dataset = folder_with_broken(tmp_path, broken=1)
    loader = DataLoader(dataset, batch_size=10, num_workers=2, multiprocessing_context="fork")
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.tolist() == dataset.labels.tolist()
    assert dataset.unreadable_count == 1

    too_many = folder_with_broken(tmp_path / "worse", broken=3)
    with pytest.raises(UnreadableImagesError):
        list(DataLoader(too_many, batch_size=10, num_workers=2, multiprocessing_context="fork"))
    assert too_many.unreadable_count >= 2
    with pytest.raises(UnreadableImagesError, match=r"of 100 images could not be decoded"):
        too_many.check_unreadable()
