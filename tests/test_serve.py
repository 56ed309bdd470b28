"""python -m gca_pyg.serve: the search page on a local port, over HTTP and in headless Chromium."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

import gca_pyg.app.index as index_cli
import gca_pyg.app.serve as serve_cli

from browser import CHROMIUM, FLAGS, SKIP_REASON
from retrieval_fixtures import make_checkpoint, write_gallery

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

K = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An index of 3 classes × 4 images, served on a free local port for the module's tests."""
    root = tmp_path_factory.mktemp("serve")
    gallery = write_gallery(root / "gallery")
    checkpoint = make_checkpoint(root / "run" / "last.pt")
    out = root / "index"
    argv = [str(checkpoint), "--images", str(gallery), "--label-folders", "--out", str(out)]
    assert index_cli.main(argv + ["--workers", "0"]) == 0
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gca_pyg.serve", str(out), "--port", str(port), "-k", str(K)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                assert json.load(response) == {"status": "ok", "images": 12}
                break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() - started < 120, "the server did not start"
            time.sleep(0.2)
    yield {"url": url, "gallery": gallery, "index": out}
    process.terminate()
    process.communicate(timeout=30)


def post_image(url, path, k=None):
    """A multipart/form-data POST of one image file (and k), as a browser's form sends it."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"'
        f"\r\nContent-Type: image/png\r\n\r\n".encode()
        + path.read_bytes()
        + b"\r\n"
    ]
    if k is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode()
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    return urllib.request.urlopen(request, timeout=60)


def test_a_port_in_use_is_one_error_line(server, capsys):
    port = server["url"].rsplit(":", 1)[1]
    assert serve_cli.main([str(server["index"]), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serving" not in err
    assert f"error: could not listen on 127.0.0.1:{port} (" in err and "pass another --port" in err


def test_the_api_answers_like_search_json(server):
    query = server["gallery"] / "class2" / "1.png"
    with post_image(f"{server['url']}/api/search", query, k=3) as response:
        result = json.load(response)
    assert result["query"] == "1.png"
    neighbours = result["neighbors"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3]
    assert neighbours[0]["path"] == str(query.resolve())
    assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(n["label"] == "class2" for n in neighbours)


def post_json(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=60)


def test_vectors_embedded_elsewhere_are_searched_as_json(server):
    embeddings = np.load(server["index"] / "embeddings.npy")
    vectors = (embeddings[[2, 7]] * 5).tolist()  # any length: they are normalised
    with post_json(f"{server['url']}/api/vectors", {"vectors": vectors, "k": 2}) as response:
        results = json.load(response)["results"]
    assert [r["query"] for r in results] == ["vector-0", "vector-1"]
    assert [[n["id"] for n in r["neighbors"]][0] for r in results] == [2, 7]
    assert all(len(r["neighbors"]) == 2 for r in results)
    assert results[0]["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(urllib.error.HTTPError) as error:
        post_json(f"{server['url']}/api/vectors", {"vectors": [[1.0, 2.0]]})
    assert error.value.code == 422
    assert "have 2 dimensions and the gallery's embeddings 16" in error.value.read().decode()


def test_a_file_that_is_not_an_image_is_a_readable_error(server, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(urllib.error.HTTPError) as error:
        post_image(f"{server['url']}/search", fake)
    assert error.value.code == 400
    assert "notes.png is not an image this page can read" in error.value.read().decode()


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_a_person_picks_an_image_and_sees_its_neighbours(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    query = server["gallery"] / "class1" / "3.png"
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            args=FLAGS,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        try:
            page = browser.new_page()
            page.goto(server["url"] + "/")
            assert page.locator(".query-row").count() == 0
            # Picking a file sends the form at once (the page's script); no click needed.
            with page.expect_navigation():
                page.set_input_files("#image", str(query))
            page.wait_for_selector(".query-row")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            tiles = page.locator(".query-row .thumb")
            assert tiles.count() == 1 + K
            assert "query" in tiles.nth(0).get_attribute("class")
            neighbours = page.locator(".query-row .thumb:not(.query)")
            first = neighbours.nth(0)
            assert first.get_attribute("data-path") == str(query.resolve())
            assert float(first.get_attribute("data-score")) == pytest.approx(1.0, abs=1e-4)
            for i in range(K):  # each neighbour shows its thumbnail, decoded by the browser
                image = neighbours.nth(i).locator("img")
                assert image.evaluate("img => img.complete && img.naturalWidth > 0")
            assert page.locator("#summary").inner_text().startswith(f"Top {K} of 12 for 3.png")
        finally:
            browser.close()
