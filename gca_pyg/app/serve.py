"""``python -m gca_pyg.serve INDEX_DIR [--port 8000] [--host 127.0.0.1] [-k 10]``

A small search page on this machine for an index folder written by ``python -m gca_pyg.index``:
a person drops an image on the page (or picks one) and sees its nearest gallery images with their
cosine similarities, drawn like the report's gallery. It listens on localhost unless ``--host``
says otherwise. Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart):
``pip install "gca-pyg[serve]"``.

Routes: ``GET /`` the page; ``POST /search`` (form field ``image``, optional ``k``) the page with
the results; ``POST /api/search`` the same as JSON (``{"query": ..., "neighbors": [...]}``, as
``python -m gca_pyg.search --json``); ``POST /api/vectors`` query vectors embedded elsewhere
(JSON ``{"vectors": [[...], ...], "k": 10}``, answered with ``{"results": [...]}``, one object as
above per vector; the only search of a folder indexed from embeddings without a checkpoint);
``GET /health``.
"""

import argparse
import html
import importlib.util
import io
import socket
import sys
import threading
from typing import Annotated, Optional

import numpy as np
from PIL import Image

from gca_pyg.app.html import result_row, results_page
from gca_pyg.data import DECODE_ERRORS
from gca_pyg.errors import ConfigError, GcaError, MissingExtraError
from gca_pyg.retriever import Retriever

#: Largest upload accepted, in bytes.
MAX_UPLOAD = 32 * 2**20
#: Most neighbours a request may ask for.
MAX_K = 100

FORM = """<form id="search" action="/search" method="post" enctype="multipart/form-data">
<label class="drop" id="drop">Drop an image here, or <input type="file" name="image" id="image"
accept="image/*" required></label>
<label>neighbours <input type="number" name="k" id="k" value="{k}" min="1" max="{max_k}"></label>
<button type="submit" id="go">Search</button>
</form>
"""
# Drop an image on the frame (or pick one): the form is sent at once.
SCRIPT = """<script>
const form = document.getElementById("search"), drop = document.getElementById("drop"),
      input = document.getElementById("image");
input.addEventListener("change", () => { if (input.files.length) form.requestSubmit(); });
["dragenter", "dragover"].forEach(name => drop.addEventListener(name, event => {
  event.preventDefault(); drop.classList.add("over"); }));
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", event => {
  event.preventDefault(); drop.classList.remove("over");
  if (event.dataTransfer.files.length) { input.files = event.dataTransfer.files;
    form.requestSubmit(); }
});
</script>
"""
FORM_STYLE = """
<style>
form { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin-bottom: 18px; }
.drop { border: 2px dashed #9aa6b2; border-radius: 8px; padding: 18px 22px; background: #f7f9fa; }
.drop.over { border-color: #2b5fad; background: #eef3fb; }
input[type=number] { width: 4em; }
.error { color: #d7263d; font-weight: 600; }
</style>
"""


def _require_extras():
    missing = [
        name
        for name, modules in (
            ("fastapi", ("fastapi",)),
            ("uvicorn", ("uvicorn",)),
            ("python-multipart", ("python_multipart", "multipart")),
        )
        if not any(importlib.util.find_spec(module) for module in modules)
    ]
    if missing:
        raise MissingExtraError(
            f"the search page needs {', '.join(missing)}, which is not installed: "
            'pip install "gca-pyg[serve]"'
        )


def create_app(retriever: Retriever, k: int = 10, title: Optional[str] = None):
    """The FastAPI application of the search page over `retriever`, `k` neighbours by default."""
    _require_extras()
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse
    from pydantic import BaseModel

    default_k = k

    class VectorQuery(BaseModel):
        vectors: list[list[float]]
        k: int = default_k

    app = FastAPI(title="gca_pyg search", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one search at a time: the model is not shared across threads
    title = title or "gca_pyg search"
    if retriever.embedder is None:
        model = "indexed without a model: search it by POSTing vectors to /api/vectors"
    else:
        state = retriever.embedder.checkpoint.state
        model = f"of {html.escape(str(state.get('source_checkpoint', '')))}"
    about = (
        f"{len(retriever):,} images, {retriever.dim}-d embeddings {model}; neighbours ranked by "
        "cosine similarity."
    )

    def page(body: str = "", wanted: int = k, status: int = 200) -> HTMLResponse:
        form = FORM_STYLE + FORM.format(k=wanted, max_k=MAX_K) + SCRIPT
        return HTMLResponse(results_page(title, about, form + body), status_code=status)

    async def read_query(image: UploadFile) -> Image.Image:
        data = await image.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise HTTPException(413, f"the image is larger than {MAX_UPLOAD >> 20} MB")
        try:
            with Image.open(io.BytesIO(data)) as picture:
                return picture.convert("RGB")
        except DECODE_ERRORS:
            raise HTTPException(
                400, f"{image.filename or 'the upload'} is not an image this page can read"
            ) from None

    def check_k(wanted: int):
        if not 1 <= wanted <= MAX_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_K}, got {wanted}")

    def search(picture: Image.Image, name: str, wanted: int):
        check_k(wanted)
        with lock:
            try:
                return retriever.search([picture], wanted, names=[name])[0]
            except ConfigError as error:  # a folder without a model
                raise HTTPException(400, str(error)) from None

    @app.get("/", response_class=HTMLResponse)
    def home():
        return page('<p class="lead">Pick or drop an image to see its nearest neighbours.</p>')

    @app.get("/health")
    def health():
        return {"status": "ok", "images": len(retriever)}

    @app.post("/search", response_class=HTMLResponse)
    async def search_page(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = k):
        try:
            picture = await read_query(image)
            result = search(picture, image.filename or "upload", k)
        except HTTPException as error:
            body = f'<p class="error" id="error">{html.escape(str(error.detail))}</p>'
            return page(body, k, error.status_code)
        caption = (
            f'<p class="lead" id="summary">Top {len(result.ids)} of {len(retriever):,} for '
            f"{html.escape(result.query)}:</p>"
        )
        return page(caption + result_row(retriever, result, picture, None), k)

    @app.post("/api/search")
    async def search_api(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = k):
        picture = await read_query(image)
        return search(picture, image.filename or "upload", k).to_dict()

    @app.post("/api/vectors")
    def search_vectors(query: VectorQuery):
        check_k(query.k)
        if len({len(vector) for vector in query.vectors}) != 1:
            raise HTTPException(
                422, f"vectors must be one or more rows of {retriever.dim} numbers each"
            )
        names = [f"vector-{i}" for i in range(len(query.vectors))]
        with lock:
            try:
                found = retriever.search_embeddings(np.array(query.vectors), query.k, names)
            except ConfigError as error:  # another size, NaN, zeros
                raise HTTPException(422, str(error)) from None
        return {"results": [result.to_dict() for result in found]}

    return app


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.serve",
        description="A local search page for an index folder (python -m gca_pyg.index).",
    )
    parser.add_argument("index_dir", metavar="INDEX_DIR", help="the index folder")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine)",
    )
    parser.add_argument("-k", type=int, default=10, help="neighbours shown (default: 10)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the model's)")
    return parser.parse_args(argv)


def _cannot_listen(host: str, port: int) -> Optional[str]:
    """Why a server could not listen on host:port (e.g. "Address already in use"), or None.

    Tried before anything is printed, with the address reuse uvicorn sets, so that a port in use
    is one error line instead of a "serving at" line followed by uvicorn's own error."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        return error.strerror or str(error)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        _require_extras()
        if not 1 <= args.k <= MAX_K:
            raise ConfigError(f"-k must be between 1 and {MAX_K}, got {args.k}")
        retriever = Retriever.load(args.index_dir, device=args.device)
        app = create_app(retriever, args.k, title=f"gca_pyg search: {args.index_dir}")
    except GcaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    refusal = _cannot_listen(args.host, args.port)
    if refusal is not None:
        print(
            f"error: could not listen on {args.host}:{args.port} ({refusal}); pass another --port",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    print(
        f"serving {args.index_dir} ({len(retriever):,} images) at "
        f"http://{args.host}:{args.port}/ (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except SystemExit as error:  # uvicorn exits when it cannot bind the port
        print(
            f"error: could not listen on {args.host}:{args.port} (in use?); pass another --port",
            file=sys.stderr,
        )
        return 2 if error.code else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
