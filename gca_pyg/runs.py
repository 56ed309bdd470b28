"""A training run as the commands see it: its checkpoint, the config and model in it, and its logs.

:func:`open_checkpoint` is the one way from a checkpoint to a config and a model: ``evaluate``,
``report``, ``index``, ``search``, ``serve``, ``export`` and ``train --resume`` all start there.
:class:`RunLog` writes what a run records as it trains (``steps.csv``, ``log.jsonl``, TensorBoard
events) and, when a run resumes, forgets what was logged after the checkpoint it resumes from;
:func:`read_log` reads ``log.jsonl`` back.
"""

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from gca_pyg.checkpoint import CheckpointError, load_checkpoint
from gca_pyg.config import Config, apply_overrides
from gca_pyg.model import GCAHNG
from gca_pyg.pipeline import build_model
from gca_pyg.runtime import resolve_device

__all__ = ["RunCheckpoint", "open_checkpoint", "RunLog", "read_log"]

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
        model = build_model(self.config, len(self.state["classes"]), device, load_weights=False)
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


class RunLog:
    """What a training run records in its folder as it trains.

    * ``steps.csv``: one row per step (``step``, ``epoch``, then every loss the step returned);
    * ``log.jsonl``: one JSON object per epoch;
    * TensorBoard events under ``tensorboard/`` when ``tensorboard`` is installed.

    Under ``torchrun`` only rank 0 writes (`enabled` False elsewhere). A run that resumes from a
    checkpoint passes the step and epoch the checkpoint was written at: the lines and events a
    previous process logged after it are dropped, so that every step and epoch appears exactly once
    however that process ended.

    Args:
        run_dir: The run folder (created if needed).
        enabled: Write at all (rank 0).
        resumed_at: ``(steps, epochs)`` done at the checkpoint a resumed run starts from.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        resumed_at: Optional[tuple[int, int]] = None,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tensorboard = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        steps = 0
        if resumed_at is not None:
            steps, epochs = resumed_at
            _keep_lines(
                self.run_dir / "steps.csv",
                lambda line, first: first or int(line.split(",", 1)[0]) <= steps,
            )
            _keep_lines(
                self.run_dir / "log.jsonl", lambda line, first: json.loads(line)["epoch"] <= epochs
            )
        self.tensorboard = _tensorboard_writer(self.run_dir, purge_step=steps + 1)

    def step(self, step: int, epoch: int, values: dict[str, float]):
        """Logs the losses of training step `step` (counted from 1 over the whole run)."""
        if not self.enabled:
            return
        with open(self.run_dir / "steps.csv", "a", newline="") as handle:
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(["step", "epoch", *values])
            writer.writerow([step, epoch, *(f"{v:.6g}" for v in values.values())])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)

    def test_metrics(self, epoch: int, metrics: dict[str, float]):
        """Logs the test metrics of an evaluation after `epoch` (to TensorBoard; the epoch record
        of :meth:`epoch` carries them into ``log.jsonl``)."""
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"test/{name}", value, epoch)

    def epoch(self, record: dict[str, Any]):
        """Appends the record of an epoch (with its ``epoch`` number) to ``log.jsonl``."""
        if self.enabled:
            with open(self.run_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def read_log(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/log.jsonl`` (one per epoch), minus a line cut short by a crash."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}, line {number}, is not JSON and is left out of the curves",
                RuntimeWarning,
                stacklevel=2,
            )
    return records


def _keep_lines(path: Path, keep: Callable[[str, bool], bool]):
    """Rewrites the text file `path` (atomically) with the lines for which ``keep(line, first)``
    holds."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for index, line in enumerate(lines) if line.strip() and keep(line, index == 0)]
    if len(kept) != len(lines):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)


def _tensorboard_writer(run_dir: Path, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    # purge_step drops events a crashed process logged after the checkpoint this run resumes from.
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
