"""A training run's logs, as the commands write and read them.

(Its checkpoint, and the config and model in it, are :mod:`gca_pyg.checkpoint`'s.)
:class:`RunLog` writes what a run records as it trains (``steps.csv``, ``log.jsonl``, TensorBoard
events) and, when a run resumes, forgets what was logged after the checkpoint it resumes from;
:func:`read_log` reads ``log.jsonl`` back.
"""

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["RunLog", "read_log"]


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
