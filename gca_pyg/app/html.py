"""Retrieval galleries in HTML: a query's thumbnail beside its neighbours', each neighbour framed by
whether it shares the query's label.

The report's retrieval section, ``python -m gca_pyg.search --html`` and the search page of
``python -m gca_pyg.serve`` draw their rows with :func:`gallery_row` and style them with
:data:`GALLERY_STYLE`; search and serve draw a query's row with :func:`result_row` and a page of
them with :func:`results_page`. Thumbnails are written as small files next to a page
(:class:`ThumbnailFiles`, for the report's folder) or embedded in it (:func:`data_uri`, for a page
that must stand alone as one file).
"""

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from PIL import Image

from gca_pyg.retriever import Retriever, SearchResult

__all__ = [
    "THUMBNAIL_SIZE",
    "GALLERY_STYLE",
    "Tile",
    "ThumbnailFiles",
    "data_uri",
    "thumbnail",
    "neighbour_kind",
    "tile_html",
    "gallery_row",
    "img_html",
    "PAGE_STYLE",
    "result_row",
    "results_page",
]

#: Largest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 128
#: Images smaller than this (in pixels) are drawn with visible pixels rather than blurred.
PIXELATED_BELOW = 96

#: The CSS of :func:`gallery_row`: blue frame for the query, green for a neighbour of its label, red
#: for another label, grey where labels are unknown.
GALLERY_STYLE = """
.query-row { display: flex; gap: 6px; align-items: flex-start; margin-bottom: 8px;
  flex-wrap: wrap; }
.thumb { width: 84px; font-size: 11px; color: #56606b; text-align: center;
  overflow-wrap: anywhere; }
.thumb img, .thumb .missing { width: 78px; height: 78px; object-fit: contain; display: block;
  margin: 0 auto 2px; border: 3px solid transparent; background: #f0f2f4; box-sizing: content-box; }
.thumb img.pixelated { image-rendering: pixelated; }
.query img, .query .missing { border-color: #2b5fad; }
.same img, .same .missing { border-color: #1f9d3a; }
.other img, .other .missing { border-color: #d7263d; }
.unlabelled img, .unlabelled .missing { border-color: #b8c0c8; }
.query { width: 150px; color: #1d232a; font-weight: 600; margin-right: 10px; }
.thumb .score { display: block; color: #1d232a; }
"""

ImageLike = Union[Image.Image, torch.Tensor]


@dataclass
class Tile:
    """One thumbnail of a gallery row.

    Attributes:
        src: The image's address (a file next to the page or a ``data:`` URI); None draws an empty
            frame (an item whose image cannot be shown).
        small: The image is smaller than it is drawn (drawn pixelated).
        caption: The text under the image.
        kind: ``query``, ``same`` (the query's label), ``other`` (another label) or ``unlabelled``.
        label: The item's label, if known (``data-class`` of the tile).
        title: Text shown when the pointer rests on the image.
        path: Where the item came from (``data-path`` of the tile), if it has a path.
        score: The neighbour's similarity to the query (``data-score``), shown under the caption.
    """

    src: Optional[str]
    small: bool
    caption: str
    kind: str
    label: Optional[str] = None
    title: str = ""
    path: Optional[str] = None
    score: Optional[float] = None


def thumbnail(image: ImageLike) -> Image.Image:
    """`image` (a ``PIL.Image``, or a tensor ``(3, H, W)`` in [0, 1] or ``uint8``) as an RGB image
    of at most :data:`THUMBNAIL_SIZE` pixels a side."""
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        image = to_pil_image(image)
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return image


def _encode(image: Image.Image) -> tuple[bytes, str]:
    """Small images stay lossless (PNG); photographs are smaller as JPEG."""
    buffer = io.BytesIO()
    if max(image.size) < THUMBNAIL_SIZE:
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue(), "jpg"


def data_uri(image: ImageLike) -> tuple[str, bool]:
    """The thumbnail of `image` as a ``data:`` URI, and whether it is smaller than drawn."""
    small = thumbnail(image)
    data, kind = _encode(small)
    mime = "image/png" if kind == "png" else "image/jpeg"
    return (
        f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}",
        max(small.size) < PIXELATED_BELOW,
    )


class ThumbnailFiles:
    """Writes the thumbnails of a collection's items into `folder` on demand, each once.

    Args:
        load: Item index → its image as stored (``PIL.Image`` or image tensor).
        folder: Where the files go; a page in ``folder``'s parent refers to them.
        prefix: The start of each file name (``{prefix}-{index}.png`` or ``.jpg``).
    """

    def __init__(self, load: Callable[[int], ImageLike], folder: Path, prefix: str):
        self.load, self.folder, self.prefix = load, Path(folder), prefix
        self.written: dict[int, tuple[str, bool]] = {}

    def __call__(self, index: int) -> tuple[str, bool]:
        """The thumbnail's path relative to the page, and whether it is smaller than drawn."""
        if index not in self.written:
            image = thumbnail(self.load(index))
            data, kind = _encode(image)
            name = f"{self.prefix}-{index}.{kind}"
            (self.folder / name).write_bytes(data)
            self.written[index] = (
                f"{self.folder.name}/{name}",
                max(image.size) < PIXELATED_BELOW,
            )
        return self.written[index]


def neighbour_kind(query_label: Optional[str], label: Optional[str]) -> str:
    """``same``, ``other``, or ``unlabelled`` when either label is unknown."""
    if query_label is None or label is None:
        return "unlabelled"
    return "same" if label == query_label else "other"


def img_html(src: str, small: bool, alt: str, title: str = "") -> str:
    """An ``<img>`` of a thumbnail (pixelated when `small`)."""
    klass = ' class="pixelated"' if small else ""
    title = f' title="{html.escape(title)}"' if title else ""
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{klass}{title}>'


def tile_html(tile: Tile) -> str:
    """One ``<div class="thumb KIND">`` with the image (or an empty frame) and its caption."""
    attributes = f' data-class="{html.escape(tile.label or "")}"'
    if tile.path is not None:
        attributes += f' data-path="{html.escape(tile.path)}"'
    if tile.score is not None:
        attributes += f' data-score="{tile.score:.6f}"'
    alt = tile.label or (Path(tile.path).name if tile.path else tile.caption)
    image = (
        img_html(tile.src, tile.small, alt, tile.title)
        if tile.src is not None
        else f'<div class="missing" title="{html.escape(tile.title or "no image")}"></div>'
    )
    score = f'<span class="score">{tile.score:.3f}</span>' if tile.score is not None else ""
    return (
        f'<div class="thumb {tile.kind}"{attributes}>{image}{html.escape(tile.caption)}'
        f"{score}</div>"
    )


def gallery_row(query: Tile, neighbours: Sequence[Tile]) -> str:
    """A query's tile followed by its neighbours', best first."""
    return f'<div class="query-row">{"".join(tile_html(t) for t in (query, *neighbours))}</div>'


PAGE_STYLE = (
    """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #1d232a; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
.lead { color: #56606b; margin: 0 0 16px; }
"""
    + GALLERY_STYLE
)


def result_row(
    retriever: Retriever, result: SearchResult, image: Optional[Any], label: Optional[str]
) -> str:
    """The gallery row of one query (its `image`; None for a vector) and its neighbours,
    thumbnails embedded."""
    src, small = data_uri(image) if image is not None else (None, False)
    caption = label or Path(result.query).name
    query = Tile(src, small, caption, "query", label=label, path=result.query, title=result.query)
    tiles = []
    for rank, item in enumerate(result.neighbors(), start=1):
        picture = retriever.image(item["id"])
        src, small = data_uri(picture) if picture is not None else (None, False)
        tiles.append(
            Tile(
                src,
                small,
                caption=f"{rank}. {item['label'] or Path(item['path']).name}",
                kind=neighbour_kind(label, item["label"]),
                label=item["label"],
                title=f"rank {rank}: {item['path']}",
                path=item["path"],
                score=item["score"],
            )
        )
    return gallery_row(query, tiles)


def results_page(title: str, lead: str, body: str) -> str:
    """A standalone HTML page around gallery rows (`body`)."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="lead">{lead}</p>
{body}
</body>
</html>
"""
