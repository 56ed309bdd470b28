"""``python -m gca_pyg.search INDEX_DIR (QUERY... | --vectors Q.npy) [-k 10] [--json] [--html F]``

Searches an index folder written by ``python -m gca_pyg.index`` with query images (files, or
folders searched recursively), embedded by the model that embedded the gallery, or with query
vectors embedded elsewhere (``--vectors``: a ``.npy`` of one row per query, named ``Q.npy:i``;
the only way to search a folder indexed from embeddings without a checkpoint). Prints a table per
query (rank, cosine similarity, label, path); ``--json`` prints one JSON object per query and line
instead::

    {"query": PATH, "neighbors": [{"rank": 1, "id": 0, "path": ..., "score": ..., "label": ...}]}

``--html OUT.html`` also writes one self-contained page (thumbnails embedded, no server needed):
each query beside its top k with their scores, framed green or red by whether their label is the
query's where labels are known (the query's own, when it is in the gallery; with
``--label-folders``, its folder's name).
"""

import argparse
import html
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from gca_pyg.app.html import result_row, results_page
from gca_pyg.data import DECODE_ERRORS, find_images, open_rgb
from gca_pyg.errors import ConfigError, DatasetNotFoundError, exit_status, warn
from gca_pyg.retriever import Retriever, SearchResult, read_vectors
from gca_pyg.vector_index import check_vectors


def query_files(queries: Sequence[str]) -> list[str]:
    """The image files of `queries` (files, and the images under folders), in order.

    Raises:
        DatasetNotFoundError: If a query does not exist, or no image is found.
    """
    files = []
    for query in queries:
        path = Path(query).expanduser()
        if path.is_dir():
            files += [str(found) for found in find_images(path)]
        elif path.is_file():
            files.append(str(path))
        else:
            raise DatasetNotFoundError(f"query {query}: no such file or folder")
    if not files:
        raise DatasetNotFoundError(f"no query images in {', '.join(queries)}")
    return files


def query_label(retriever: Retriever, query: str, label_folders: bool) -> Optional[str]:
    """The label of a query: its gallery label when it is in the gallery, else (with
    `label_folders`) its folder's name, else None."""
    found = retriever.find(str(Path(query).resolve()))
    if found is not None:
        return retriever.labels[found]
    return Path(query).parent.name if label_folders else None


def format_table(result: SearchResult) -> str:
    """A readable table of one query's neighbours."""
    rows = [("rank", "score", "label", "path")] + [
        (str(n["rank"]), f"{n['score']:.4f}", n["label"] or "-", n["path"])
        for n in result.neighbors()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"query {result.query}"]
    for row in rows:
        lines.append(
            "  ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2])])
            + "  "
            + row[3]
        )
    return "\n".join(lines)


def query_vectors(retriever: Retriever, path: str) -> tuple[np.ndarray, list[str]]:
    """The rows of ``--vectors`` and their names (``Q.npy:i``)."""
    vectors, _ = read_vectors(path, "--vectors")
    if len(vectors) == 0:
        raise ConfigError(f"--vectors {path} holds no rows; give one row per query")
    check_vectors(vectors, f"--vectors {path}", retriever.dim)
    return vectors, [f"{Path(path).name}:{i}" for i in range(len(vectors))]


def query_images(retriever: Retriever, files: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The embeddings of the readable query images and their paths (the others are warned of)."""
    embeddings, readable = retriever.model().embed(files)
    for name in (f for f, ok in zip(files, readable) if not ok):
        warn(f"query {name} is not a readable image; skipped")
    if not readable.any():
        raise ConfigError(f"none of the {len(files)} query images could be read")
    return embeddings[readable], [f for f, ok in zip(files, readable) if ok]


def run(args: argparse.Namespace) -> list[SearchResult]:
    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    files = query_files(args.queries) if args.queries else None  # before opening the index
    retriever = Retriever.load(
        args.index_dir, device=args.device, batch_size=args.batch_size, num_workers=0
    )
    if args.k > len(retriever):
        warn(f"the index holds {len(retriever)} images: showing all of them, not {args.k}")
    if args.vectors is not None:
        embeddings, names = query_vectors(retriever, args.vectors)
    else:
        embeddings, names = query_images(retriever, files)
    results = retriever.search_embeddings(embeddings, args.k, names)
    for result in results:
        print(json.dumps(result.to_dict()) if args.json else format_table(result) + "\n")
    if args.html:
        rows = []
        for result in results:
            try:
                image = None if args.vectors is not None else open_rgb(result.query)
            except DECODE_ERRORS:  # it was readable a moment ago
                image = Image.new("RGB", (8, 8))
            label = query_label(retriever, result.query, args.label_folders)
            rows.append(result_row(retriever, result, image, label))
        lead = (
            f"{len(results)} queries against {html.escape(str(args.index_dir))} "
            f"({len(retriever):,} images); top {min(args.k, len(retriever))} by cosine "
            "similarity. Blue: the query; green: a neighbour with the query's label; red: "
            "another label; grey: labels unknown."
        )
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(results_page("gca_pyg search", lead, "\n".join(rows)), encoding="utf-8")
        print(f"page written to {out} ({out.resolve().as_uri()})", file=sys.stderr)
    return results


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.search",
        description="Search an index folder (python -m gca_pyg.index) with query images.",
    )
    parser.add_argument("index_dir", metavar="INDEX_DIR", help="the index folder")
    parser.add_argument(
        "queries", nargs="*", metavar="QUERY", help="query images, or folders of them"
    )
    parser.add_argument(
        "--vectors",
        metavar="Q.npy",
        help="query vectors instead of images: a .npy file (or .npz/.pt with embeddings), one row "
        "per query, of the gallery's embedding size",
    )
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query and line")
    parser.add_argument("--html", metavar="OUT.html", help="also write a page of thumbnails")
    parser.add_argument(
        "--label-folders",
        action="store_true",
        help="label each query by its folder's name (for the page's frames)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the model's)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="queries per batch")
    args = parser.parse_args(argv)
    if bool(args.queries) == (args.vectors is not None):
        parser.error("give query images (QUERY...) or --vectors Q.npy, one of the two")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
