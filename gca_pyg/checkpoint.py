"""gca_pyg's checkpoints: the one module that writes and reads them.

Every command, ``--resume`` and ``model.init`` go through here: :func:`save_checkpoint` writes,
:func:`load_checkpoint` reads (and upgrades older formats), :func:`open_checkpoint` turns a
checkpoint into its config and model (:class:`RunCheckpoint`), :func:`initial_model` builds the
model a training run starts from (``model.pretrained``, or every weight of ``model.init``: a
gca_pyg checkpoint or the authors' state dict), and :func:`convert_authors_file` turns the authors'
file into a checkpoint (:mod:`gca_pyg.authors` maps their tensors).

A checkpoint is written to a temporary file in the target folder, flushed to disk, then renamed over
the old one, so a crash, a full disk or Ctrl-C during the write leaves the previous checkpoint
intact. It holds only tensors and plain Python values and is loaded with ``weights_only=True``.

Checkpoints of an older format are upgraded as they are read (:func:`load_checkpoint`), so the
runs of earlier releases resume, evaluate and report; a newer format is one clear error.
"""

import errno
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from gca_pyg import __version__
from gca_pyg.authors import (
    OFFICIAL_TRAIN_CLASSES,
    OUR_PREFIXES,
    check_fits,
    class_rows,
    convert_state_dict,
    tensors,
    their_classes,
    their_state,
)
from gca_pyg.config import Config, apply_overrides
from gca_pyg.errors import ConfigError, GcaError, warn
from gca_pyg.model import GCAHNG, build_model
from gca_pyg.runtime import resolve_device

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_weights",
    "upgrade_format_1",
    "rng_state",
    "set_rng_state",
    "RunCheckpoint",
    "open_checkpoint",
    "initial_model",
    "load_initial_weights",
    "convert_authors_file",
]

#: Bumped when the layout of a checkpoint changes incompatibly. Format 2 (gca_pyg 0.2.0): the
#: correlation net and the softmax classifier live in ``model.generator``, with the running means
#: of the schedules; format 1 (gca_pyg 0.1.0) kept them at the top of the model and the trainer.
FORMAT_VERSION = 2


class CheckpointError(GcaError, OSError):
    """A checkpoint could not be written or read."""


def save_checkpoint(state: dict[str, Any], path: Union[str, Path]):
    """Writes `state` to `path` atomically (temporary file + fsync + rename).

    Raises:
        CheckpointError: If the file cannot be written (e.g. no space left); the previous file at
            `path`, if any, is untouched and the temporary file is removed.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(
                {"format_version": FORMAT_VERSION, "written_by": __version__, **state}, handle
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on the device"
        else:
            reason = error.strerror or str(error)
        previous = (
            "the previous checkpoint there is intact"
            if path.exists()
            else "no earlier checkpoint exists there"
        )
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; {previous}. Free space or choose "
            "another folder with --set train.output_dir=DIR, then resume"
        ) from None


def load_checkpoint(
    path: Union[str, Path], map_location: Union[str, torch.device] = "cpu"
) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`; a run folder means its ``last.pt``.
    A checkpoint of format 1 (gca_pyg 0.1.0) comes back in the current format.

    Raises:
        CheckpointError: If there is no such file, it is not a gca_pyg checkpoint, or a newer
            gca_pyg wrote it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a run folder (holding last.pt) or a "
            ".pt file written by python -m gca_pyg.train"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable gca_pyg checkpoint "
            f"({type(error).__name__}); it may be truncated or from another "
            "program"
        ) from None
    if not _is_checkpoint(state):
        raise CheckpointError(
            f"{path} is not a gca_pyg checkpoint (no known format_version); it may be from "
            "another program"
        )
    return _current_format(state, path)


def read_weights(path: Union[str, Path], what: str) -> dict[str, Any]:
    """A weight file of any origin (``model.init``, the authors' ``.pth``): a gca_pyg checkpoint
    comes back as :func:`load_checkpoint` returns it (checked, older formats upgraded), anything
    else as ``torch.load`` (``weights_only``) reads it.

    Raises:
        CheckpointError: One line naming `what` the file is for, if it is missing or unreadable,
            or a newer gca_pyg wrote it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no file {path} ({what})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} ({what}) is not a readable PyTorch weight file ({type(error).__name__}); it "
            "may be truncated"
        ) from None
    return _current_format(state, path) if _is_checkpoint(state) else state


def _is_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "format_version" in state


def _current_format(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint read from `path` in the current format (format 1 upgraded), or one error."""
    version = state.get("format_version")
    if version == 1:
        return upgrade_format_1(state)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, written by gca_pyg "
            f"{state.get('written_by', 'newer than ' + __version__)}; this gca_pyg "
            f"({__version__}) reads formats 1 to {FORMAT_VERSION}: upgrade gca_pyg to read it"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a gca_pyg checkpoint (no known format_version); it may be from "
            "another program"
        )
    return state


def upgrade_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 (gca_pyg 0.1.0) in format 2.

    Format 1 kept the correlation net and the softmax classifier at the top of the model
    (``net.*``, ``classifier.*``) and the running means of the schedules in the trainer's state
    (``mean_metric_loss``, ``mean_generator_loss`` and the epoch's per-step ``metric_losses`` and
    ``generator_losses``). Format 2 holds both in the model's generator (``generator.net.*``,
    ``generator.classifier.*``, ``generator._extra_state``) and counts the epoch's steps in the
    trainer (``steps_in_epoch``). Sums are taken in step order, as the running means take them, so
    a resumed run continues bit for bit.
    """
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("training"), dict):
        return {**state, "format_version": FORMAT_VERSION}  # not a training checkpoint: no keys
    model = {
        f"generator.{key}" if key.startswith(("net.", "classifier.")) else key: value
        for key, value in state["model"].items()
    }
    training = dict(state["training"])
    metric_losses = training.pop("metric_losses")
    generator_losses = training.pop("generator_losses")
    model["generator._extra_state"] = {
        "mean_metric_loss": training.pop("mean_metric_loss"),
        "mean_generator_loss": training.pop("mean_generator_loss"),
        "sums": {"metric": sum(metric_losses, 0.0), "generator": sum(generator_losses, 0.0)},
        "counts": {"metric": len(metric_losses), "generator": len(generator_losses)},
    }
    training["steps_in_epoch"] = len(metric_losses)
    return {**state, "format_version": FORMAT_VERSION, "model": model, "training": training}


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) random generators."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]):
    """Restores what :func:`rng_state` returned."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """Python's random state is nested tuples; a load may hand them back as lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


#: What every checkpoint of a training run holds besides its format version.
REQUIRED_KEYS = ("config", "model", "classes")
#: The parts of the model that turn an image into its embedding.
EMBEDDER_PREFIXES = ("backbone.", "embedding.")


@dataclass
class RunCheckpoint:
    """A checkpoint written by ``python -m gca_pyg.train`` and the config it holds.

    Attributes:
        path: The ``.pt`` file.
        state: Everything in it (``config``, ``model``, ``classes``, and the training state).
        config: Its config, with the overrides it was opened with applied.
    """

    path: Path
    state: dict[str, Any]
    config: Config

    @property
    def run_dir(self) -> Path:
        """The folder of the checkpoint: the run's, for ``last.pt`` and ``best.pt``."""
        return self.path.parent

    @property
    def classes(self) -> list[str]:
        """The names of the training classes."""
        return list(self.state["classes"])

    @property
    def epoch(self) -> Optional[int]:
        """The epochs trained, where the checkpoint records them."""
        return self.state.get("training", {}).get("epoch")

    @property
    def provenance(self) -> str:
        """Where its weights come from: ``after epoch N`` of training, or ``converted from FILE``
        (``python -m gca_pyg.convert``)."""
        origin = self.state.get("converted_from")
        if origin:
            return f"converted from {origin}"
        return f"after epoch {self.epoch if self.epoch is not None else '?'}"

    def build_model(self, device: Optional[torch.device] = None) -> GCAHNG:
        """The model of the config with the checkpoint's weights, in eval mode, on `device`
        (default: ``train.device`` of the config).

        Raises:
            CheckpointError: If the weights do not fit the model (e.g. a ``--set`` changed its
                shape).
        """
        device = device if device is not None else resolve_device(self.config.train.device)
        model = build_model(self.config, len(self.state["classes"]), device, pretrained=False)
        try:
            model.load_state_dict(self.state["model"])
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise CheckpointError(
                f"the weights in {self.path} do not fit the model of its config "
                f"({first[1].strip() if len(first) > 1 else first[0]}); do not --set model "
                "shapes when loading a checkpoint"
            ) from None
        return model.eval()

    def embedder_fingerprint(self) -> str:
        """A hash of what maps an image to its embedding: the backbone's and embedding head's
        weights and the test transform's settings. Two checkpoints with the same fingerprint embed
        every image alike."""
        digest = hashlib.sha256()
        data = self.config.data
        transform = {"demo": data.dataset == "demo", "size": data.image_size, "resize": data.resize}
        digest.update(json.dumps(transform, sort_keys=True).encode())
        weights = self.state["model"]
        for name in sorted(weights):
            if name.startswith(EMBEDDER_PREFIXES):
                tensor = weights[name].detach().cpu().contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def open_checkpoint(
    path: Union[str, Path], overrides: Sequence[str] = (), data_root: Optional[str] = None
) -> RunCheckpoint:
    """Reads a checkpoint (a ``.pt`` file, or a run folder meaning its ``last.pt``) and its config.

    Args:
        path: The checkpoint or run folder.
        overrides: ``section.key=value`` config overrides, e.g. ``train.device=cpu``.
        data_root: Sets ``data.root`` (the dataset moved since training).

    Raises:
        CheckpointError: If there is no such file, it is not a gca_pyg checkpoint, or it lacks a
            model and its config.
        ConfigError: If an override is invalid.
    """
    path = Path(path)
    file = path / "last.pt" if path.is_dir() else path
    state = load_checkpoint(file)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{file} holds no {' and no '.join(missing)}: it is not a checkpoint of "
            "python -m gca_pyg.train"
        )
    config = Config.from_dict(
        apply_overrides(state["config"], overrides, data_root), source=f"the checkpoint {file}"
    )
    return RunCheckpoint(file, state, config)


def initial_model(
    config: Config,
    num_classes: int,
    device: torch.device,
    *,
    process_group=None,
) -> GCAHNG:
    """The model a training run of `config` starts from (:func:`~gca_pyg.model.build_model`):
    with ``model.init``, every weight of that checkpoint (:func:`load_initial_weights`); else the
    backbone's pretrained weights of ``model.pretrained``."""
    model = build_model(config, num_classes, device, process_group=process_group)
    if config.model.init is not None:
        load_initial_weights(model, config.model.init, config)
    return model


def load_initial_weights(model: torch.nn.Module, path: Union[str, Path], config: Config):
    """Loads every weight of `model` from ``model.init``: a gca_pyg checkpoint, or a state dict of
    the authors' code (converted on the fly).

    The classifiers (softmax and node classifier) start afresh when the checkpoint was trained on
    another number of classes; every other tensor must fit.

    Raises:
        ReferenceFormatError, CheckpointError, ConfigError: One line naming the mismatch.
    """
    what = "model.init"
    state = read_weights(path, what)
    if isinstance(state, dict) and "format_version" in state and "model" in state:
        _check_same_network(state.get("config", {}), config, path)
        weights, notes = state["model"], []
    else:
        source = f"{path} ({what})"
        check_fits(state, config, source)
        weights, notes = convert_state_dict(state, model, source, other_classes=True)
    targets = tensors(model)
    fresh = []
    for key, target in targets.items():
        value = weights.get(key)
        if value is None:
            raise ConfigError(f"{what} {path} has no {key}: it is not a checkpoint of this network")
        if value.shape != target.shape:
            if not class_rows(key, value, weights, targets):
                raise ConfigError(
                    f"{what} {path}: {key} is {list(value.shape)} there but "
                    f"{list(target.shape)} in this config's network; use a config of the same "
                    "network (e.g. its data.image_size)"
                )
            fresh.append(key)
    model.load_state_dict(
        {
            **model.state_dict(),  # the generator's schedule state starts afresh: a new run
            **{key: targets[key] if key in fresh else weights[key] for key in targets},
        }
    )
    for note in notes:
        warn(note)
    if fresh:
        classifier = OUR_PREFIXES["classifier"] + "weight"
        warn(
            f"{what} {path} was trained on {weights[classifier].shape[0]} classes, this data set "
            f"has {targets[classifier].shape[0]}: its classifiers ({len(fresh)} tensors) start "
            "afresh, every other weight is loaded"
        )


def _check_same_network(saved: dict, config: Config, path):
    """A gca_pyg checkpoint for `model.init` must hold the network of `config`."""
    keys = [
        ("model", "backbone"),
        ("model", "embedding_size"),
        ("net", "num_layers"),
        ("net", "heads"),
    ]
    for section, key in keys:
        theirs = saved.get(section, {}).get(key)
        ours = getattr(getattr(config, section), key)
        if theirs is not None and theirs != ours:
            raise ConfigError(
                f"model.init {path} was trained with {section}.{key}={theirs} but the config "
                f"has {ours}; --set {section}.{key}={theirs}"
            )


def convert_authors_file(
    path: Union[str, Path], config: Config, num_classes: Optional[int] = None
) -> tuple[dict, list[str]]:
    """The gca_pyg checkpoint of the authors' state dict in file `path`, for `config`.

    Args:
        path: Their ``.pth`` file.
        config: The network it must fit (the recipe of its data set and backbone).
        num_classes: Training classes, for a metric-model file without classifier; by default
            the number of training classes of ``config.data.dataset``'s official split.

    Returns:
        ``(checkpoint, notes)``: what :func:`~gca_pyg.checkpoint.save_checkpoint` writes, which
        ``python -m gca_pyg.evaluate`` and ``model.init`` read, and notes for the user.
    """
    source = str(path)
    state = read_weights(path, "the authors' state dict")
    check_fits(state, config, source)
    state = their_state(state, source)
    classes = their_classes(state) or num_classes or OFFICIAL_TRAIN_CLASSES.get(config.data.dataset)
    if classes is None:
        raise ConfigError(
            f"{source} holds no classifier to count the training classes of "
            f"{config.data.dataset}; pass --classes N"
        )
    model = build_model(config, classes, torch.device("cpu"), pretrained=False)
    weights, notes = convert_state_dict(state, model, source)
    model.load_state_dict(weights)
    saved = Config.from_dict(config.to_dict())
    saved.model.init = None
    checkpoint = {
        "config": saved.to_dict(),
        "model": model.state_dict(),
        "classes": [f"class {index}" for index in range(classes)],
        "converted_from": source,
    }
    return checkpoint, notes
