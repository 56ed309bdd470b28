"""The official datasets and the folder dataset, on tiny copies of their layouts."""

import importlib.util
import os
import re
import sys

import pytest
import torch
from PIL import Image

from gca_pyg.data import (
    CUB200,
    DATASETS,
    Cars196,
    ImageFolderByClass,
    InShop,
    StanfordOnlineProducts,
    get_dataset,
    transforms,
)
from gca_pyg.errors import ConfigError, DatasetLayoutError, DatasetNotFoundError, GcaError
from tests.data_layouts import make_cars, make_cub, make_folder, make_inshop, make_sop, write_image

needs_scipy = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None, reason="scipy is needed to write cars_annos.mat"
)

# dataset class, fixture builder, splits that must be class-disjoint, classes per split.
OFFICIAL = {
    "cub": (CUB200, make_cub, ("train", "test"), 2),
    "cars": (Cars196, make_cars, ("train", "test"), 2),
    "sop": (StanfordOnlineProducts, make_sop, ("train", "test"), 3),
    "inshop": (InShop, make_inshop, ("train", "gallery"), 3),
}


def official(name):
    marks = [needs_scipy] if name == "cars" else []
    return pytest.param(name, marks=marks, id=name)


ALL_OFFICIAL = [official(name) for name in OFFICIAL]


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_splits_are_class_disjoint_with_contiguous_labels(tmp_path, name):
    cls, make, (first, second), num_classes = OFFICIAL[name]
    make(tmp_path)
    a, b = cls(tmp_path, first, verify_counts=False), cls(tmp_path, second, verify_counts=False)
    assert not set(a.classes) & set(b.classes)
    for ds in (a, b):
        assert ds.labels.dtype == torch.long and ds.labels.ndim == 1
        assert ds.num_classes == num_classes
        assert ds.labels.unique().tolist() == list(range(num_classes))
        image, label = ds[len(ds) - 1]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == int(ds.labels[-1])


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_root_is_the_extracted_folder_or_its_parent(tmp_path, name):
    cls, make, (split, _), _ = OFFICIAL[name]
    extracted = make(tmp_path)
    from_parent = cls(tmp_path, split, verify_counts=False)
    from_folder = cls(extracted, split, verify_counts=False)
    assert from_parent.root == from_folder.root == extracted
    assert from_parent.paths == from_folder.paths


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_official_counts_are_checked_by_default(tmp_path, name):
    cls, make, (split, _), _ = OFFICIAL[name]
    make(tmp_path)
    with pytest.raises(
        DatasetLayoutError, match=r"the official archive has \d\d,\d{3}.*verify_counts=False"
    ):
        cls(tmp_path, split)


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_missing_image_is_named(tmp_path, name):
    cls, make, (split, _), _ = OFFICIAL[name]
    make(tmp_path)
    victim = cls(tmp_path, split, verify_counts=False).paths[1]
    os.remove(victim)
    missing = rf"1 of the \d+ images that .* lists are missing, e\.g\. {re.escape(victim)}"
    with pytest.raises(DatasetLayoutError, match=missing):
        cls(tmp_path, split, verify_counts=False)


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, name):
    cls = OFFICIAL[name][0]
    with pytest.raises(DatasetNotFoundError) as error:
        cls(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere") in message
    assert "http" in message and "python -m gca_pyg.train demo" in message
    with pytest.raises(DatasetNotFoundError, match="folders directly inside it"):
        cls(tmp_path)


def test_resource_forks_beside_the_images_are_not_images(tmp_path):
    make_cub(tmp_path)
    train = CUB200(tmp_path, "train", verify_counts=False)
    assert len(train) == 6 and not any("/._" in path for path in train.paths)


def test_cub_index_files_must_agree(tmp_path):
    root = make_cub(tmp_path)
    labels = root / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt and images.txt"):
        CUB200(tmp_path, verify_counts=False)


def test_half_extracted_index_file_is_named(tmp_path):
    root = make_cub(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="classes.txt is missing"):
        CUB200(tmp_path, verify_counts=False)


def test_sop_header_is_checked(tmp_path):
    root = make_sop(tmp_path)
    index = root / "Ebay_test.txt"
    index.write_text(index.read_text().replace("super_class_id", "superclass"))
    with pytest.raises(DatasetLayoutError, match="Ebay_test.txt: the header"):
        StanfordOnlineProducts(tmp_path, "test", verify_counts=False)


def test_inshop_query_and_gallery_share_labels(tmp_path):
    make_inshop(tmp_path)
    query = InShop(tmp_path, "query", verify_counts=False)
    gallery = InShop(tmp_path, "gallery", verify_counts=False)
    assert query.classes == gallery.classes == ["id_00000004", "id_00000005", "id_00000006"]
    assert len(query) == 2 and len(gallery) == 7
    # Item 4 has no query, yet the queries' labels are those of their items in the gallery.
    assert query.labels.tolist() == [1, 2]
    assert gallery.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert all("/id_00000005/" in path for path in [query.paths[0], *gallery.paths[3:5]])


def test_inshop_first_line_count_is_checked(tmp_path):
    partition = make_inshop(tmp_path) / "Eval" / "list_eval_partition.txt"
    partition.write_text("17" + partition.read_text()[2:])
    with pytest.raises(DatasetLayoutError, match="line 1 states 17 images but 18 rows follow"):
        InShop(tmp_path, verify_counts=False)


@needs_scipy
def test_cars_without_scipy_names_the_extra(tmp_path, monkeypatch):
    make_cars(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(GcaError, match=r'pip install "gca-pyg\[cars\]"'):
        Cars196(tmp_path, verify_counts=False)


def test_invalid_split_is_a_value_error(tmp_path):
    make_inshop(tmp_path)
    with pytest.raises(ValueError, match="'train', 'query', 'gallery'"):
        InShop(tmp_path, "test")


def test_folder_splits_class_folders_in_name_order(tmp_path):
    make_folder(tmp_path, names=("dog", "ant", "cat", "bee", "eel"))
    write_image(tmp_path / "dog" / "notes.txt", 0)  # not an image by its extension
    (tmp_path / "empty").mkdir()
    train, test = ImageFolderByClass(tmp_path, "train"), ImageFolderByClass(tmp_path, "test")
    assert train.classes == ["ant", "bee"] and test.classes == ["cat", "dog", "eel"]
    assert len(train) == 6 and len(test) == 9
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not any("._" in path or path.endswith(".txt") for path in train.paths + test.paths)


def test_folder_with_explicit_train_and_test(tmp_path):
    make_folder(tmp_path / "train", names=("ant", "bee"))
    make_folder(tmp_path / "test", names=("cat", "dog", "eel"))
    assert ImageFolderByClass(tmp_path, "train").classes == ["ant", "bee"]
    assert ImageFolderByClass(tmp_path, "test").classes == ["cat", "dog", "eel"]


def test_folder_warns_when_explicit_splits_share_classes(tmp_path):
    make_folder(tmp_path / "train", names=("ant", "bee"))
    make_folder(tmp_path / "test", names=("bee", "cat"))
    with pytest.warns(UserWarning, match="share 1 class names"):
        ImageFolderByClass(tmp_path, "train")


def test_folder_needs_two_classes_per_split(tmp_path):
    make_folder(tmp_path, names=("ant", "bee", "cat"))
    with pytest.raises(DatasetLayoutError, match="gives the train split 1 class folder"):
        ImageFolderByClass(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="does not exist.*gca_pyg.train demo"):
        ImageFolderByClass(tmp_path / "nowhere")


def test_get_dataset_by_name(tmp_path):
    make_cub(tmp_path)
    make_folder(tmp_path / "own")
    assert set(DATASETS) == {"cub", "cars", "sop", "inshop", "folder", "demo"}
    cub = get_dataset("cub", tmp_path, "test", verify_counts=False)
    assert isinstance(cub, CUB200) and cub.classes[0] == "003.Bird_3"
    assert get_dataset("folder", tmp_path / "own", "train").classes == ["ant", "bee"]
    with pytest.raises(ConfigError, match="unknown dataset 'cub200'; valid names: cub, cars, sop"):
        get_dataset("cub200", tmp_path)


def test_standard_transforms_give_normalised_tensors_of_the_asked_size():
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    assert transforms.train_transform()(image).shape == (3, 224, 224)
    assert transforms.train_transform(size=64)(image).shape == (3, 64, 64)
    test = transforms.test_transform(resize=128, crop=112)(image)
    assert test.shape == (3, 112, 112)
    # White normalises to (1 - mean) / std per channel.
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert torch.allclose(test[:, 56, 56], expected, atol=1e-4)
    assert transforms.test_transform()(image).shape == (3, 224, 224)
