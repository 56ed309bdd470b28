"""From a :class:`~gca_pyg.config.Config` to datasets, transforms, a model, embeddings and metrics:
the parts that the commands share."""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from gca_pyg.config import Config
from gca_pyg.data import (
    ClassBalancedBatchSampler,
    RetrievalDataset,
    demo_test_transform,
    demo_train_transform,
    get_dataset,
    test_transform,
    train_transform,
)
from gca_pyg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gca_pyg.distributed import Context, all_gather_objects
from gca_pyg.errors import UnreadableImagesError, warn
from gca_pyg.metrics import retrieval_metrics
from gca_pyg.model import GCAHNG

__all__ = [
    "TestData",
    "inference_transform",
    "preprocessing",
    "build_train_dataset",
    "build_train_sampler",
    "build_test_data",
    "compute_embeddings",
    "embed_test_data",
    "test_metrics",
    "evaluate",
    "format_metrics",
    "one_line_unreadable_error",
    "report_unreadable",
]


@dataclass
class TestData:
    """The evaluation split: a gallery searched by itself, or by separate queries (In-Shop)."""

    gallery: RetrievalDataset
    query: Optional[RetrievalDataset] = None

    def describe(self) -> str:
        if self.query is None:
            return f"{self.gallery.num_classes} unseen classes, {len(self.gallery)} images"
        return (
            f"{len(self.query)} queries against a gallery of {len(self.gallery)} images, "
            f"{self.gallery.num_classes} unseen items"
        )


@contextmanager
def one_line_unreadable_error(dataset: RetrievalDataset):
    """Turns an :class:`UnreadableImagesError` that a DataLoader worker raised (its message carries
    the worker's traceback) into the dataset's own one-line error."""
    try:
        yield
    except UnreadableImagesError:
        dataset.check_unreadable()
        raise


def report_unreadable(dataset: RetrievalDataset, what: str, already_reported: int = 0) -> int:
    """Warns when `dataset` has met unreadable images beyond those already reported; returns the
    count so far."""
    count = dataset.unreadable_count
    if count > already_reported:
        paths = getattr(dataset, "unreadable_paths", [])
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        warn(
            f"{count} unreadable {what} image(s) so far, each replaced by another image of its "
            f"class{': ' + shown if shown else ''}"
        )
    return count


def _transforms(config: Config):
    data = config.data
    if data.dataset == "demo":
        return demo_train_transform(size=data.image_size), demo_test_transform()
    return (
        train_transform(data.image_size, scale=tuple(data.crop_scale)),
        test_transform(data.resize, data.image_size),
    )


def inference_transform(config: Config) -> v2.Compose:
    """What the model of `config` sees of an image at test time: the test transform, for a
    ``PIL.Image`` or an image tensor (``uint8``, or float in [0, 1]) of any size.

    For the demo recipe (whose test transform takes its 32×32 float tensors as they are) images are
    converted to float, resized (shorter side) and centre-cropped to ``data.image_size``: the demo's
    own images pass unchanged."""
    if config.data.dataset != "demo":
        return _transforms(config)[1]
    size = config.data.image_size
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            *demo_test_transform().transforms,
        ]
    )


def preprocessing(config: Config) -> dict:
    """What :func:`inference_transform` does, as plain values for another program to repeat:
    resize the shorter side to ``resize``, centre-crop ``crop`` × ``crop``, scale to [0, 1],
    subtract ``mean`` and divide by ``std`` per RGB channel."""
    data = config.data
    return {
        "resize": data.image_size if data.dataset == "demo" else data.resize,
        "crop": data.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def build_train_dataset(config: Config) -> RetrievalDataset:
    train, _ = _transforms(config)
    return get_dataset(config.data.dataset, config.data.root, "train", train)


def build_train_sampler(
    config: Config, labels, num_replicas: int = 1, rank: int = 0
) -> ClassBalancedBatchSampler:
    """The class-balanced batches of `config` over the training `labels`; with `num_replicas`
    processes, this `rank`'s share (whole classes) of every global batch."""
    data = config.data
    return ClassBalancedBatchSampler(
        labels,
        data.classes_per_batch,
        data.samples_per_class,
        class_sampling=data.class_sampling,
        seed=config.train.seed,
        num_replicas=num_replicas,
        rank=rank,
    )


def build_test_data(config: Config) -> TestData:
    _, test = _transforms(config)
    data = config.data
    if data.dataset == "inshop":
        return TestData(
            gallery=get_dataset("inshop", data.root, "gallery", test),
            query=get_dataset("inshop", data.root, "query", test),
        )
    return TestData(gallery=get_dataset(data.dataset, data.root, "test", test))


def loader_options(config: Config, device: torch.device, num_workers: Optional[int] = None) -> dict:
    """DataLoader options for `config` on `device`, with `num_workers` decoding processes (default:
    the config's ``data.num_workers``)."""
    workers = config.data.num_workers if num_workers is None else num_workers
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": False,
        **({"prefetch_factor": 2} if workers else {}),
    }


def compute_embeddings(
    model: GCAHNG, dataset: RetrievalDataset, config: Config, context: Optional[Context] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (not normalised) and labels of every item of `dataset`, in order, on the CPU.

    Under ``torchrun`` (a `context` with several processes) each process embeds a contiguous
    share of the items and every process receives all of them."""
    context = context or Context(device=model.device)
    share = np.array_split(np.arange(len(dataset)), context.world_size)[context.rank]
    part = dataset if context.world_size == 1 else Subset(dataset, share.tolist())
    loader = DataLoader(
        part,
        batch_size=config.eval.batch_size,
        shuffle=False,
        **loader_options(config, model.device),
    )
    embeddings: list[torch.Tensor] = []
    with one_line_unreadable_error(dataset):
        for images, _ in loader:
            embeddings.append(model.embed(images).cpu())
    dataset.check_unreadable()
    report_unreadable(dataset, "test")
    if not embeddings:  # more processes than items
        embeddings.append(torch.empty(0, model.embedding[1].out_features))
    gathered = torch.cat(all_gather_objects(torch.cat(embeddings), context.process_group))
    return gathered, torch.as_tensor(dataset.labels)


def embed_test_data(
    model: GCAHNG, test_data: TestData, config: Config, context: Optional[Context] = None
) -> dict[str, torch.Tensor]:
    """``embeddings``/``labels`` of the gallery, plus ``query_embeddings``/``query_labels``."""
    gallery, gallery_labels = compute_embeddings(model, test_data.gallery, config, context)
    embedded = {"embeddings": gallery, "labels": gallery_labels}
    if test_data.query is not None:
        query, query_labels = compute_embeddings(model, test_data.query, config, context)
        embedded.update(query_embeddings=query, query_labels=query_labels)
    return embedded


def test_metrics(embedded: dict[str, torch.Tensor], ks: list[int]) -> dict[str, float]:
    """Recall@K, MAP@R and RP (docs/method.md, "Evaluation") of what :func:`embed_test_data`
    returned."""
    return retrieval_metrics(
        embedded["embeddings"],
        embedded["labels"],
        ks=ks,
        query=embedded.get("query_embeddings"),
        query_labels=embedded.get("query_labels"),
    )


test_metrics.__test__ = False  # not a pytest test, though its name starts with "test_"


def evaluate(
    model: GCAHNG, test_data: TestData, config: Config, context: Optional[Context] = None
) -> dict[str, float]:
    """Embeds the test split (in shares across processes) and returns its retrieval metrics; under
    ``torchrun`` rank 0 computes them and every process receives them."""
    embedded = embed_test_data(model, test_data, config, context)
    process_group = context.process_group if context is not None else None
    metrics = test_metrics(embedded, config.eval.ks) if context is None or context.is_main else None
    return all_gather_objects(metrics, process_group)[0]


def format_metrics(columns: dict[str, dict[str, float]]) -> str:
    """A table of metrics (rows) per column, in percent as papers report them."""
    names = list(next(iter(columns.values())))
    labels = {
        name: name.replace("recall@", "R@").replace("map@r", "MAP@R").replace("r_precision", "RP")
        for name in names
    }
    width = max(len("metric"), *(len(label) for label in labels.values()))
    widths = [max(len(title), 6) for title in columns]
    lines = [" | ".join(["metric".ljust(width)] + [t.rjust(w) for t, w in zip(columns, widths)])]
    lines.append("-+-".join(["-" * width] + ["-" * w for w in widths]))
    for name in names:
        cells = [
            f"{100 * column[name]:.2f}".rjust(w) for column, w in zip(columns.values(), widths)
        ]
        lines.append(" | ".join([labels[name].ljust(width)] + cells))
    return "\n".join(lines)
