"""``python -m gca_pyg.data demo-images OUT_DIR [--split test]``: the embedded demo's images as PNG
files, one folder per class, to try ``index``, ``search`` and ``serve`` on files without a data
set download."""

import argparse
import sys
from typing import Optional

from gca_pyg.data.demo import write_demo_images
from gca_pyg.errors import exit_status


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gca_pyg.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-images", help="write the demo's images as PNG files")
    demo.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    demo.add_argument("--split", choices=("train", "test"), default="test")
    args = parser.parse_args(argv)

    def write():
        count = write_demo_images(args.out_dir, args.split)
        print(
            f"wrote {count:,} demo images ({args.split} split) to {args.out_dir}/<class>/; index "
            f"them with python -m gca_pyg.index CHECKPOINT --images {args.out_dir} "
            "--label-folders --out INDEX_DIR"
        )

    return exit_status(write)


if __name__ == "__main__":
    sys.exit(main())
