"""``python -m gca_pyg.train NAME_OR_PATH [--data-root DIR] [--set section.key=value ...]``

Trains GCA-HNG with a shipped recipe (``cub``, ``cars``, ``sop``, ``inshop``, their ``_googlenet``
variants, ``folder``, ``demo``) or a YAML file; evaluates every ``train.eval_every`` epochs; writes
``last.pt``, ``best.pt`` (by Recall@1), ``config.yaml``, ``log.jsonl`` and ``steps.csv`` to a fresh
run folder (and TensorBoard events when tensorboard is installed). ``--resume RUN_DIR`` continues a
run where it stopped; Ctrl-C saves and exits (a second Ctrl-C exits at once, keeping the last save).
Errors a user can fix print one line and exit with status 2.
"""
import argparse
import csv
import json
import random
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from gca_pyg.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gca_pyg.config import Config, apply_overrides, available_configs, load_config
from gca_pyg.data import ClassBalancedBatchSampler
from gca_pyg.errors import ConfigError, GcaError, NonFiniteLossError
from gca_pyg.pipeline import (build_model, build_test_data, build_train_dataset, evaluate,
                              format_metrics, loader_options, one_line_unreadable_error,
                              report_unreadable, resolve_device)
from gca_pyg.runtime import retain_freed_memory

#: Exit status of a run stopped by Ctrl-C after saving (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class _SkipBatches(Sampler):
    """The batches of a batch sampler after the first `skip` (resuming in the middle of an epoch)."""
    def __init__(self, batch_sampler: Sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[List[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip


class Trainer:
    """One training run: data, model, the epoch loop, evaluation, logs and checkpoints."""

    def __init__(self, config: Config, run_dir: Path, resume_state: Optional[Dict] = None):
        self.config = config
        self.run_dir = run_dir
        self.device = resolve_device(config.train.device)
        _seed_everything(config.train.seed)
        self.train_data = build_train_dataset(config)
        self.test_data = build_test_data(config)
        self.sampler = ClassBalancedBatchSampler(
            self.train_data.labels, config.data.classes_per_batch, config.data.samples_per_class,
            seed=config.train.seed)
        self.model = build_model(config, self.train_data.num_classes, self.device)
        self.batch_in_epoch = 0
        self.best = {"recall@1": -1.0, "epoch": 0}
        self.last_metrics: Optional[Dict[str, float]] = None
        self.stop_requested = False
        self.reported_unreadable = 0
        if resume_state is not None:
            self._restore(resume_state)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.tensorboard = _tensorboard_writer(run_dir)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Trains to ``optim.epochs``; returns the exit status (0, or 130 after Ctrl-C)."""
        cfg = self.config
        print(f"gca_pyg: training {cfg.name} on {self.device} — {len(self.train_data)} images of "
              f"{self.train_data.num_classes} classes; testing on {self.test_data.describe()}; "
              f"run folder {self.run_dir}", file=sys.stderr)
        with self._ctrl_c_saves():
            while self.model.epoch < cfg.optim.epochs:
                epoch = self.model.epoch + 1
                started = time.perf_counter()
                losses = self._train_epoch(epoch)
                if self.stop_requested:
                    self._save("last.pt")
                    print(f"\nInterrupted in epoch {epoch} after {self.batch_in_epoch} batches; saved "
                          f"{self.run_dir / 'last.pt'}. Continue with: python -m gca_pyg.train "
                          f"--resume {self.run_dir}", file=sys.stderr)
                    return INTERRUPTED
                self.model.end_epoch()
                self.batch_in_epoch = 0
                self.reported_unreadable = report_unreadable(self.train_data, "training",
                                                             self.reported_unreadable)
                record = {"epoch": epoch, "seconds": round(time.perf_counter() - started, 2),
                          **losses, "lr_metric": self.model.metric_optimizer.param_groups[0]["lr"],
                          "lr_net": self.model.net_optimizer.param_groups[0]["lr"],
                          "unreadable_images": self.train_data.unreadable_count}
                if epoch % cfg.train.eval_every == 0 or epoch == cfg.optim.epochs:
                    record.update(self._evaluate(epoch))
                self._log_epoch(record)
                self._save("last.pt")
        self._print_results()
        return 0

    def _train_epoch(self, epoch: int) -> Dict[str, float]:
        self.sampler.set_epoch(epoch - 1)
        batches = _SkipBatches(self.sampler, self.batch_in_epoch)
        generator = torch.Generator().manual_seed(self.config.train.seed * 100_003 + epoch)
        loader = DataLoader(self.train_data, batch_sampler=batches, generator=generator,
                            worker_init_fn=_seed_worker, **loader_options(self.config, self.device))
        sums: Dict[str, float] = {}
        progress = tqdm(loader, desc=f"epoch {epoch}/{self.config.optim.epochs}",
                        total=len(self.sampler), initial=self.batch_in_epoch, leave=False,
                        dynamic_ncols=True, file=sys.stderr)
        with one_line_unreadable_error(self.train_data), progress:
            for images, labels in progress:
                logs = self._step(images, labels, epoch)
                self.batch_in_epoch += 1
                for name, value in logs.items():
                    sums[name] = sums.get(name, 0.0) + value
                progress.set_postfix({k: f"{logs[k]:.3g}" for k in ("J_m", "J_metric", "J_gen")
                                      if k in logs})
                if self.stop_requested:
                    break
        steps = max(len(loader), 1)
        return {name: total / steps for name, total in sums.items()}

    def _step(self, images, labels, epoch: int) -> Dict[str, float]:
        try:
            logs = self.model.training_step(images, labels)
        except NonFiniteLossError as error:
            last = self.run_dir / "last.pt"
            kept = (f"the last good checkpoint is {last} (end of epoch {self.model.epoch})"
                    if last.exists() else "no checkpoint was written yet")
            raise NonFiniteLossError(f"{error}; stopped, {kept}") from None
        step = (epoch - 1) * len(self.sampler) + self.batch_in_epoch + 1
        with open(self.run_dir / "steps.csv", "a", newline="") as handle:
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(["step", "epoch", *logs])
            writer.writerow([step, epoch, *(f"{v:.6g}" for v in logs.values())])
        if self.tensorboard is not None:
            for name, value in logs.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)
        return logs

    def _evaluate(self, epoch: int) -> Dict[str, float]:
        metrics = evaluate(self.model, self.test_data, self.config)
        self.last_metrics = {"epoch": epoch, **metrics}
        summary = "  ".join(f"{name.replace('recall@', 'R@')} {100 * value:.2f}"
                            for name, value in metrics.items())
        tqdm.write(f"epoch {epoch}: {summary}", file=sys.stderr)
        if metrics["recall@1"] > self.best["recall@1"]:
            self.best = {"recall@1": metrics["recall@1"], "epoch": epoch, "metrics": metrics}
            self._save("best.pt")
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"test/{name}", value, epoch)
        return {f"test/{name}": value for name, value in metrics.items()}

    def _print_results(self):
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

    # -- state ---------------------------------------------------------------------------------
    def _save(self, name: str):
        save_checkpoint({
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "training": self.model.training_state_dict(),
            "sampler": self.sampler.state_dict(),
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(),
            "best": {k: v for k, v in self.best.items() if k != "metrics"},
            "best_metrics": self.best.get("metrics", {}),
            "last_metrics": self.last_metrics or {},
            "classes": list(self.train_data.classes),
        }, self.run_dir / name)

    def _restore(self, state: Dict):
        self.model.load_state_dict(state["model"])
        self.model.load_training_state_dict(state["training"])
        self.sampler.load_state_dict(state["sampler"])
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best = dict(state["best"])
        if state["best_metrics"]:
            self.best["metrics"] = dict(state["best_metrics"])
        self.last_metrics = dict(state["last_metrics"]) or None
        set_rng_state(state["rng"])

    def _log_epoch(self, record: Dict):
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    @contextmanager
    def _ctrl_c_saves(self):
        """First Ctrl-C: finish the current step, save, exit. Second: stop at once."""
        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            tqdm.write("Ctrl-C: saving after this step (press again to quit without saving)",
                       file=sys.stderr)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int):
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.train.output_dir).expanduser() / f"{config.name}-{stamp}"
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    return run_dir


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.train", description="Train GCA-HNG.",
        epilog=f"shipped configs: {', '.join(available_configs())}")
    parser.add_argument("config", nargs="?", metavar="NAME_OR_PATH",
                        help="a shipped config name or a YAML file (not needed with --resume)")
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder (sets data.root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last.pt")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    retain_freed_memory()
    try:
        if args.resume:
            state = load_checkpoint(args.resume)
            # --set / --data-root still apply, e.g. optim.epochs=200 to train longer.
            config = Config.from_dict(
                apply_overrides(state["config"], args.overrides, args.data_root),
                source=f"the checkpoint in {args.resume}")
            run_dir = Path(args.resume)
            if run_dir.is_file():
                run_dir = run_dir.parent
            return Trainer(config, run_dir, resume_state=state).fit()
        if args.config is None:
            raise ConfigError("name a config (e.g. python -m gca_pyg.train demo) or pass "
                              "--resume RUN_DIR")
        config = load_config(args.config, args.overrides, args.data_root)
        return Trainer(config, _new_run_dir(config)).fit()
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nStopped without saving; the last checkpoint is unchanged.", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
