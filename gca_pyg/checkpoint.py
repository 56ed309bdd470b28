"""Checkpoints that never lose work.

A checkpoint is written to a temporary file in the target folder, flushed to disk, then renamed over
the old one, so a crash, a full disk or Ctrl-C during the write leaves the previous checkpoint
intact. It holds only tensors and plain Python values and is loaded with ``weights_only=True``.

Checkpoints of an older format are upgraded as they are read (:func:`load_checkpoint`), so the
runs of earlier releases resume, evaluate and report; a newer format is one clear error.
"""

import errno
import os
import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from gca_pyg import __version__
from gca_pyg.errors import GcaError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "upgrade_format_1",
    "rng_state",
    "set_rng_state",
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
    version = state.get("format_version") if isinstance(state, dict) else None
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
