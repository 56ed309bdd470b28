"""``python -m gca_pyg.train NAME_OR_PATH [--data-root DIR] [--set section.key=value ...]``

Trains GCA-HNG with a shipped recipe (``cub``, ``cars``, ``sop``, ``inshop``, their ``_googlenet``
variants, ``folder``, ``demo``) or a YAML file; evaluates every ``train.eval_every`` epochs; writes
``last.pt``, ``best.pt`` (by Recall@1), ``config.yaml``, ``log.jsonl`` and ``steps.csv`` to a fresh
run folder (and TensorBoard events when tensorboard is installed). ``--resume RUN_DIR`` continues a
run where it stopped; Ctrl-C saves and exits (a second Ctrl-C exits at once, keeping the last save).
Errors a user can fix print one line and exit with status 2.

``torchrun --nproc-per-node W -m gca_pyg.train ...`` trains with W processes on one batch graph
(see :mod:`gca_pyg.distributed`); rank 0 alone prints, logs and writes checkpoints.
"""

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from gca_pyg.app.report import report_command
from gca_pyg.app.runs import RunLog
from gca_pyg.checkpoint import (
    initial_model,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gca_pyg.config import Config, add_override_argument, available_configs, load_config
from gca_pyg.distributed import Context, all_gather_objects, any_process, setup, teardown
from gca_pyg.errors import (
    ConfigError,
    DatasetLayoutError,
    DatasetNotFoundError,
    GcaError,
    MissingExtraError,
    NonFiniteLossError,
    WeightsUnavailableError,
)
from gca_pyg.model import build_model
from gca_pyg.pipeline import (
    build_test_data,
    build_train_dataset,
    build_train_sampler,
    evaluate,
    format_metrics,
    loader_options,
    one_line_unreadable_error,
    report_unreadable,
)
from gca_pyg.runtime import (
    FreedMemoryLimit,
    resolve_device,
    retain_freed_memory,
    use_deterministic_algorithms,
)
from gca_pyg.trainer import AlternatingTrainer

#: Exit status of a run stopped by Ctrl-C after saving (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class _SkipBatches(Sampler):
    """The batches of a batch sampler after the first `skip` (resuming mid-epoch)."""

    def __init__(self, batch_sampler: Sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip


class TrainingRun:
    """One training run: data, model and trainer, the epoch loop, evaluation, logs and checkpoints.

    Under ``torchrun`` every process runs it on its share of each batch (whole classes); rank 0
    alone prints, logs and writes checkpoints."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        resume_state: Optional[dict] = None,
        context: Optional[Context] = None,
    ):
        self.config = config
        self.run_dir = run_dir
        self.context = context or Context(device=resolve_device(config.train.device))
        self.device = self.context.device
        self.is_main = self.context.is_main
        _seed_everything(config.train.seed)
        use_deterministic_algorithms(config.train.deterministic)
        self.train_data = build_train_dataset(config)
        self.test_data = build_test_data(config)
        self.sampler = build_train_sampler(
            config,
            self.train_data.labels,
            num_replicas=self.context.world_size,
            rank=self.context.rank,
        )
        build = initial_model if resume_state is None else partial(build_model, pretrained=False)
        self.model = build(  # a resumed run loads every weight from its checkpoint
            config,
            self.train_data.num_classes,
            self.device,
            process_group=self.context.process_group,
        )
        self.trainer = AlternatingTrainer(
            self.model,
            config.optim,
            seed=config.train.seed,
            diagnostics=config.train.diagnostics,
        )
        self.memory_limit = FreedMemoryLimit()
        self.batch_in_epoch = 0
        self.best = {"recall@1": -1.0, "epoch": 0}
        self.last_metrics: Optional[dict[str, float]] = None
        self.stop_requested = False
        self.reported_unreadable = 0
        if resume_state is not None:
            self._restore(resume_state)
        self.log = RunLog(
            run_dir,
            enabled=self.is_main,
            resumed_at=(
                None if resume_state is None else (self._global_step(), self.trainer.epoch)
            ),
        )
        if self.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Trains to ``optim.epochs``; returns the exit status (0, or 130 after Ctrl-C)."""
        cfg = self.config
        processes = (
            f" in {self.context.world_size} processes" if self.context.world_size > 1 else ""
        )
        self._print(
            f"gca_pyg: training {cfg.name} on {self.device}{processes} — "
            f"{len(self.train_data)} images of {self.train_data.num_classes} classes; "
            f"testing on {self.test_data.describe()}; run folder {self.run_dir}"
        )
        with self._ctrl_c_saves(), closing(self.log):
            while self.trainer.epoch < cfg.optim.epochs:
                epoch = self.trainer.epoch + 1
                started = time.perf_counter()
                self._train_epoch(epoch)
                if self.stop_requested:
                    self._save("last.pt")
                    self._print(
                        f"\nInterrupted in epoch {epoch} after {self.batch_in_epoch} "
                        f"batches; saved {self.run_dir / 'last.pt'}. Continue with: "
                        f"{_command()} --resume {self.run_dir}"
                    )
                    return INTERRUPTED
                schedule = {
                    "hardness": self.trainer.hardness,
                    "synthetic_weight": self.trainer.synthetic_weight,
                }
                losses = self.trainer.end_epoch()
                self.batch_in_epoch = 0
                self.reported_unreadable = report_unreadable(
                    self.train_data, "training", self.reported_unreadable
                )
                record = {
                    "epoch": epoch,
                    "seconds": round(time.perf_counter() - started, 2),
                    **losses,
                    **schedule,
                    **self.trainer.learning_rates,
                    "unreadable_images": self.train_data.unreadable_count,
                }
                if epoch % cfg.train.eval_every == 0 or epoch == cfg.optim.epochs:
                    record.update(self._evaluate(epoch))
                self.log.epoch(record)
                self._save("last.pt")
        self._print_results()
        return 0

    def _train_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch - 1)
        batches = _SkipBatches(self.sampler, self.batch_in_epoch)
        rng = torch.Generator().manual_seed(self.config.train.seed * 100_003 + epoch)
        loader = DataLoader(
            self.train_data,
            batch_sampler=batches,
            generator=rng,
            worker_init_fn=_seed_worker,
            **loader_options(self.config, self.device),
        )
        progress = tqdm(
            loader,
            desc=f"epoch {epoch}/{self.config.optim.epochs}",
            total=len(self.sampler),
            initial=self.batch_in_epoch,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not self.is_main,
        )
        with one_line_unreadable_error(self.train_data), progress:
            for images, labels in progress:
                logs = self._step(images, labels, epoch)
                self.batch_in_epoch += 1
                progress.set_postfix(
                    {k: f"{logs[k]:.3g}" for k in ("J_m", "J_metric", "J_gen") if k in logs}
                )
                self.stop_requested = any_process(
                    self.stop_requested, self.context.process_group, self.device
                )
                if self.stop_requested:
                    break

    def _global_step(self) -> int:
        """The number of training steps done so far in this run."""
        return self.trainer.epoch * len(self.sampler) + self.batch_in_epoch

    def _step(self, images, labels, epoch: int) -> dict[str, float]:
        try:
            logs = self.trainer.training_step(images, labels)
        except NonFiniteLossError as error:
            last = self.run_dir / "last.pt"
            kept = (
                f"the last good checkpoint is {last} (end of epoch {self.trainer.epoch})"
                if last.exists()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(f"{error}; stopped, {kept}") from None
        self.memory_limit.check()
        self.log.step(self._global_step() + 1, epoch, logs)
        return logs

    def _evaluate(self, epoch: int) -> dict[str, float]:
        metrics = evaluate(self.model, self.test_data, self.config, self.context)
        self.last_metrics = {"epoch": epoch, **metrics}
        summary = "  ".join(
            f"{name.replace('recall@', 'R@')} {100 * value:.2f}" for name, value in metrics.items()
        )
        if self.is_main:
            tqdm.write(f"epoch {epoch}: {summary}", file=sys.stderr)
        if metrics["recall@1"] > self.best["recall@1"]:
            self.best = {"recall@1": metrics["recall@1"], "epoch": epoch, "metrics": metrics}
            self._save("best.pt")
        self.log.test_metrics(epoch, metrics)
        return {f"test/{name}": value for name, value in metrics.items()}

    def _print_results(self):
        if not self.is_main:
            return
        if self.last_metrics is None:
            print("No evaluation was run.")
            return
        last = {k: v for k, v in self.last_metrics.items() if k != "epoch"}
        columns = {f"last (epoch {self.last_metrics['epoch']})": last}
        if "metrics" in self.best and self.best["epoch"] != self.last_metrics["epoch"]:
            columns[f"best R@1 (epoch {self.best['epoch']})"] = self.best["metrics"]
        print(f"\n{self.config.name}: retrieval on {self.test_data.describe()} (%)")
        print(format_metrics(columns))
        print(f"\ncheckpoints: {self.run_dir / 'last.pt'}, {self.run_dir / 'best.pt'}")
        print(f"report (one more pass over the test set): {report_command(self.run_dir)}")

    def _print(self, message: str):
        if self.is_main:
            print(message, file=sys.stderr)

    # -- state ---------------------------------------------------------------------------------
    def _save(self, name: str):
        """Writes a checkpoint (rank 0; every process must call it: it gathers their RNG states)."""
        rng = all_gather_objects(rng_state(), self.context.process_group)
        if not self.is_main:
            return
        save_checkpoint(
            {
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "training": self.trainer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "batch_in_epoch": self.batch_in_epoch,
                "rng": rng[0],
                "rng_per_process": rng,
                "best": {k: v for k, v in self.best.items() if k != "metrics"},
                "best_metrics": self.best.get("metrics", {}),
                "last_metrics": self.last_metrics or {},
                "classes": list(self.train_data.classes),
            },
            self.run_dir / name,
        )

    def _restore(self, state: dict):
        saved_processes = len(state["rng_per_process"])
        if saved_processes != self.context.world_size:
            raise ConfigError(
                f"the checkpoint was written by a run of {saved_processes} process(es) but this "
                "run "
                f"has {self.context.world_size}; resume with the same number of processes "
                f"(torchrun --nproc-per-node {saved_processes})"
                if saved_processes > 1
                else "the checkpoint was written by a single-process run; resume without torchrun"
            )
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["training"])
        self.sampler.load_state_dict(state["sampler"])
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best = dict(state["best"])
        if state["best_metrics"]:
            self.best["metrics"] = dict(state["best_metrics"])
        self.last_metrics = dict(state["last_metrics"]) or None
        set_rng_state(state["rng_per_process"][self.context.rank])

    @contextmanager
    def _ctrl_c_saves(self):
        """First Ctrl-C: finish the current step, save, exit. Second: stop at once."""
        first_request = []

        def request_stop(signum, frame):
            # torchrun forwards the terminal's Ctrl-C, which every process has already received:
            # a second signal within a second is the same key press.
            if first_request and time.monotonic() - first_request[0] > 1.0:
                raise KeyboardInterrupt
            if first_request:
                return
            first_request.append(time.monotonic())
            self.stop_requested = True
            if self.is_main:
                tqdm.write(
                    "Ctrl-C: saving after this step (press again to quit without saving)",
                    file=sys.stderr,
                )

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _command() -> str:
    """How this process was started, for the messages that say how to continue."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return (
            f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} -m gca_pyg.train"
        )
    return "python -m gca_pyg.train"


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int):
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.train.output_dir).expanduser() / f"{config.name}-{stamp}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.train",
        description="Train GCA-HNG.",
        epilog=f"shipped configs: {', '.join(available_configs())}",
    )
    parser.add_argument(
        "config",
        nargs="?",
        metavar="NAME_OR_PATH",
        help="a shipped config name or a YAML file (not needed with --resume)",
    )
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder (sets data.root)")
    add_override_argument(parser, "override one config key (repeatable)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt"
    )
    return parser.parse_args(argv)


#: Errors that every process of a ``torchrun`` job meets alike (the same config, files and
#: extras): rank 0 alone prints them, instead of one line per process.
ERRORS_MET_ALIKE = (
    ConfigError,
    DatasetNotFoundError,
    DatasetLayoutError,
    MissingExtraError,
    WeightsUnavailableError,
)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    retain_freed_memory()
    context = None
    try:
        if args.resume:
            # --set / --data-root still apply, e.g. optim.epochs=200 to train longer.
            checkpoint = open_checkpoint(args.resume, args.overrides, args.data_root)
            if "converted_from" in checkpoint.state:  # python -m gca_pyg.convert: no training
                raise ConfigError(
                    f"{args.resume} is a converted checkpoint, not a run to resume; start from it "
                    f"with: python -m gca_pyg.train CONFIG --set model.init={args.resume}"
                )
            config, state, run_dir = checkpoint.config, checkpoint.state, checkpoint.run_dir
        else:
            if args.config is None:
                raise ConfigError(
                    "name a config (e.g. python -m gca_pyg.train demo) or pass --resume RUN_DIR"
                )
            config, state = load_config(args.config, args.overrides, args.data_root), None
        context = setup(
            resolve_device(config.train.device),
            config.train.dist_backend,
            config.train.dist_timeout,
        )
        if state is None:  # rank 0 names the folder: the processes' clocks may differ
            run_dir = all_gather_objects(
                _new_run_dir(config) if context.is_main else None, context.process_group
            )[0]
        return TrainingRun(config, run_dir, resume_state=state, context=context).fit()
    except GcaError as error:
        rank = context.rank if context is not None else int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(error, ERRORS_MET_ALIKE):
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nStopped without saving; the last checkpoint is unchanged.", file=sys.stderr)
        return INTERRUPTED
    finally:
        if context is not None:
            teardown(context)


if __name__ == "__main__":
    sys.exit(main())
