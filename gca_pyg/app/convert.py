"""``python -m gca_pyg.convert THEIR.pth OUT.pt --config NAME_OR_PATH [--set section.key=value]``

Turns a state dict saved by the authors' code (PWenJay/GCA-HNG: their ``train.py`` saves
``GCA_HNG.state_dict()``; their released models are such files) into a gca_pyg checkpoint:
``python -m gca_pyg.evaluate --checkpoint OUT.pt`` evaluates it and ``--set model.init=OUT.pt``
fine-tunes from it (``model.init`` also takes their file directly). The config names the network
their file must fit: the recipe of the same data set and backbone (``cub``, ``cub_googlenet``,
``cub_dino``, ...), whose values equal their configs. How their tensors map onto ours:
:mod:`gca_pyg.authors`.
"""

import argparse
import sys
from typing import Optional

from gca_pyg.checkpoint import convert_authors_file, save_checkpoint
from gca_pyg.config import add_override_argument, load_config
from gca_pyg.errors import GcaError

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.convert",
        description=(
            "Convert a state dict of the authors' GCA_HNG (PWenJay/GCA-HNG, e.g. a released "
            "model) into a gca_pyg checkpoint."
        ),
    )
    parser.add_argument("source", metavar="THEIR.pth", help="their GCA_HNG.state_dict() file")
    parser.add_argument("output", metavar="OUT.pt", help="the gca_pyg checkpoint to write")
    parser.add_argument(
        "--config",
        required=True,
        metavar="NAME_OR_PATH",
        help="the recipe of its data set and backbone (cub, cub_googlenet, cub_dino, ...) or YAML",
    )
    parser.add_argument("--data-root", metavar="DIR", help="the dataset folder (sets data.root)")
    parser.add_argument(
        "--classes",
        type=int,
        metavar="N",
        help="training classes, for a file of their metric model alone (default: the official "
        "split's)",
    )
    add_override_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, args.data_root)
        checkpoint, notes = convert_authors_file(args.source, config, args.classes)
        save_checkpoint(checkpoint, args.output)
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(
        f"{args.output}: {args.source} as a gca_pyg checkpoint of {config.name} "
        f"({config.model.backbone}, {len(checkpoint['classes'])} training classes). Evaluate: "
        f"python -m gca_pyg.evaluate --checkpoint {args.output}; fine-tune: python -m "
        f"gca_pyg.train {args.config} --set model.init={args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
