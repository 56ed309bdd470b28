"""``python -m gca_pyg.evaluate --checkpoint PATH [--data-root DIR] [--export FILE]``

Evaluates a checkpoint written by ``python -m gca_pyg.train`` on its config's test split and prints
Recall@K, MAP@R and RP. ``--export`` writes the embeddings and labels (``.npz`` or ``.pt``).
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gca_pyg.checkpoint import open_checkpoint
from gca_pyg.config import add_override_argument
from gca_pyg.errors import ConfigError, exit_status
from gca_pyg.pipeline import build_test_data, embed_test_data, format_metrics, test_metrics
from gca_pyg.runtime import retain_freed_memory

EXPORT_FORMATS = (".npz", ".pt")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.evaluate", description="Evaluate a GCA-HNG checkpoint."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a .pt file (last.pt, best.pt) or a run folder (its last.pt)",
    )
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder, if it moved")
    parser.add_argument(
        "--export",
        metavar="FILE",
        help=f"write embeddings and labels ({' or '.join(EXPORT_FORMATS)})",
    )
    add_override_argument(
        parser, "override a config key, e.g. train.device=cpu or eval.batch_size=64"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float]:
    if args.export and Path(args.export).suffix not in EXPORT_FORMATS:
        raise ConfigError(
            f"--export {args.export}: use a file name ending in {' or '.join(EXPORT_FORMATS)}"
        )
    checkpoint = open_checkpoint(args.checkpoint, args.overrides, args.data_root)
    config = checkpoint.config
    model = checkpoint.build_model()
    test_data = build_test_data(config)
    embedded = embed_test_data(model, test_data, config)
    metrics = test_metrics(embedded, config.eval.ks)
    when = checkpoint.provenance
    print(
        f"{config.name}, checkpoint {args.checkpoint} ({when}): retrieval on "
        f"{test_data.describe()} (%)"
    )
    print(format_metrics({"value": metrics}))
    if args.export:
        _export(embedded, Path(args.export))
        print(f"embeddings and labels written to {args.export}")
    return metrics


def _export(arrays: dict[str, torch.Tensor], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, **{name: value.numpy() for name, value in arrays.items()})
    else:
        torch.save(arrays, path)


def main(argv: Optional[list[str]] = None) -> int:
    retain_freed_memory()
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
