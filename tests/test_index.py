"""Indexing a gallery and searching it: python -m gca_pyg.index / search and gca_pyg.Retriever."""

import csv
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import gca_pyg.app.index as index_cli
import gca_pyg.errors
import gca_pyg.retriever
from gca_pyg.app import evaluate as evaluate_cli
from gca_pyg.app import search as search_cli
from gca_pyg.retriever import IndexFolderError, Retriever

from retrieval_fixtures import make_checkpoint, write_gallery


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A gallery of 3 classes × 4 images, a checkpoint, another one, and an index of the gallery."""
    root = tmp_path_factory.mktemp("retrieval")
    gallery = write_gallery(root / "gallery")
    checkpoint = make_checkpoint(root / "run" / "last.pt")
    other = make_checkpoint(root / "other" / "last.pt", seed=1)
    out = root / "index"
    assert index_cli.main([str(checkpoint), "--images", str(gallery), "--label-folders",
                           "--out", str(out), "--workers", "0"]) == 0  # fmt: skip
    return {"root": root, "gallery": gallery, "checkpoint": checkpoint, "other": other, "out": out}


def run_index(*args):
    return index_cli.main([str(a) for a in args] + ["--workers", "0"])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_the_index_folder_is_plain_files_read_without_gca_pyg(setup):
    out, gallery = setup["out"], setup["gallery"]
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["count"] == 12 and manifest["dim"] == 16
    assert manifest["index"]["kind"] == "flat" and manifest["checkpoint"]["epoch"] == 1
    with open(out / "items.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = sorted(str(p.resolve()) for p in gallery.rglob("*.png"))
    assert [row["path"] for row in rows] == expected
    assert [row["label"] for row in rows] == [p.split("/")[-2] for p in expected]
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (12, 16) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    index = faiss.read_index(str(out / "index.faiss"))
    scores, ids = index.search(embeddings[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)


def test_search_prints_a_table_json_and_a_page(setup, tmp_path, capsys):
    out, gallery = setup["out"], setup["gallery"]
    query = gallery / "class1" / "2.png"
    assert search_cli.main([str(out), str(query), "-k", "3"]) == 0
    table = capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0] == f"query {query}" and lines[1].split() == ["rank", "score", "label", "path"]
    assert lines[2].split() == ["1", "1.0000", "class1", str(query.resolve())]
    assert len(lines) == 2 + 3

    page = tmp_path / "page.html"
    argv = [str(out), str(query), str(gallery / "class2"), "-k", "4", "--json", "--html", page]
    assert search_cli.main([str(a) for a in argv]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == [str(query)] + [
        str(p) for p in sorted((gallery / "class2").glob("*.png"))
    ]
    for result in results:
        neighbours = result["neighbors"]
        assert [n["rank"] for n in neighbours] == [1, 2, 3, 4]
        assert neighbours[0]["path"] == str(os.path.realpath(result["query"]))
        assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-5)
        scores = [n["score"] for n in neighbours]
        assert scores == sorted(scores, reverse=True)
    tiles = _Tiles(page.read_text())
    assert len(tiles.rows) == 5 and all(len(row) == 1 + 4 for row in tiles.rows)
    for row in tiles.rows:
        (query_kind, query_src, _), *neighbours = row
        assert query_kind == "query" and query_src.startswith("data:image/")
        # The query is in the gallery: its label is known and frames its neighbours.
        assert all(kind in ("same", "other") for kind, _, _ in neighbours)
        assert all(src.startswith("data:image/") for _, src, _ in neighbours)
        assert neighbours[0][0] == "same"


class _Tiles(HTMLParser):
    """(kind, image source, data-class) of every thumbnail, row by row."""

    def __init__(self, text):
        super().__init__()
        self.rows, self._kind = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class", "").split()
        if tag == "div" and "query-row" in classes:
            self.rows.append([])
        elif tag == "div" and "thumb" in classes:
            self._kind = (classes[1], attrs["data-class"])
        elif tag == "img" and self._kind is not None:
            self.rows[-1].append((self._kind[0], attrs["src"], self._kind[1]))
            self._kind = None


def test_a_data_set_split_embeds_as_evaluate_does(setup, tmp_path, capsys):
    """--config folder --data-root: the test split (the second half of the classes), labelled by
    class, embedded exactly as python -m gca_pyg.evaluate embeds it."""
    out = tmp_path / "split"
    assert run_index(setup["checkpoint"], "--config", "folder", "--data-root", setup["gallery"],
                     "--out", out) == 0  # fmt: skip
    export = tmp_path / "emb.npz"
    assert evaluate_cli.main(["--checkpoint", str(setup["checkpoint"]), "--data-root",
                              str(setup["gallery"]), "--export", str(export)]) == 0  # fmt: skip
    capsys.readouterr()
    expected = np.load(export)["embeddings"]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), expected, atol=1e-5)
    with open(out / "items.csv", newline="") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    assert labels == ["class1"] * 4 + ["class2"] * 4  # 3 classes: the last two test


def test_an_interrupted_run_continues_without_embedding_again(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(index_cli, "CHUNK", 4)
    original = index_cli.Progress.write
    writes = []

    def write_then_stop(self, names, embeddings, readable):
        original(self, names, embeddings, readable)
        writes.append(len(names))
        if len(writes) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two chunks of four

    monkeypatch.setattr(index_cli.Progress, "write", write_then_stop)
    out = tmp_path / "resumed"
    assert run_index(setup["checkpoint"], "--images", setup["gallery"], "--label-folders",
                     "--out", out) == index_cli.INTERRUPTED  # fmt: skip
    err = capsys.readouterr().err
    assert "run the same command again to continue" in err and "Traceback" not in err
    assert not (out / "index.json").exists() and len(list((out / ".partial").glob("*.npz"))) == 2
    with pytest.raises(IndexFolderError, match="unfinished indexing run"):
        Retriever.load(out)

    writes.clear()
    assert run_index(setup["checkpoint"], "--images", setup["gallery"], "--label-folders",
                     "--out", out) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "embedding 4 of 12 images" in err and "8 embedded before are kept" in err
    assert writes == [4] and not (out / ".partial").exists()
    straight = setup["out"]
    assert (out / "items.csv").read_text() == (straight / "items.csv").read_text()
    np.testing.assert_array_equal(
        np.load(out / "embeddings.npy"), np.load(straight / "embeddings.npy")
    )


def test_append_adds_only_the_new_images(setup, tmp_path, capsys):
    gallery = write_gallery(tmp_path / "gallery", classes=2)
    out = tmp_path / "index"
    assert run_index(setup["checkpoint"], "--images", gallery, "--out", out) == 0
    before = snapshot(out)
    write_gallery(tmp_path / "more", classes=3)
    (tmp_path / "more" / "class2").rename(gallery / "class2")
    capsys.readouterr()
    # Without --append: one line, nothing written.
    assert run_index(setup["checkpoint"], "--images", gallery, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds an index of 8 images; pass --append" in err
    assert snapshot(out) == before

    assert run_index(setup["checkpoint"], "--images", gallery, "--out", out, "--append") == 0
    captured = capsys.readouterr()
    assert "embedding 4 of 12 images" in captured.err
    assert "indexed 4 new image(s)" in captured.out and "holds 12 images" in captured.out
    retriever = Retriever.load(out)
    assert len(retriever) == 12 and retriever.paths[8].endswith("class2/0.png")
    np.testing.assert_array_equal(retriever.embeddings[:8], np.load(tmp_path / "index" /
                                  "embeddings.npy")[:8])  # fmt: skip
    (result,) = retriever.search([gallery / "class2" / "3.png"], k=1)
    assert result.paths == [str((gallery / "class2" / "3.png").resolve())]


@pytest.fixture(scope="module")
def larger_gallery(tmp_path_factory):
    """4 classes × 30 tiny images: one unreadable file is under 1%, two are over."""
    return write_gallery(tmp_path_factory.mktemp("larger"), classes=4, per_class=30)


def with_broken(source, target, broken):
    for path in source.rglob("*.png"):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(path.read_bytes())
    for name in broken:
        (target / name).write_bytes(b"not an image")
    return target


def test_an_unreadable_image_is_skipped_and_listed(setup, larger_gallery, tmp_path, capsys):
    gallery = with_broken(larger_gallery, tmp_path / "gallery", ["class1/7.png"])
    out = tmp_path / "index"
    assert run_index(setup["checkpoint"], "--images", gallery, "--out", out) == 0
    printed = capsys.readouterr().out
    assert re.search(r"skipped 1 unreadable image\(s\), listed in .*unreadable\.txt: .*7\.png",
                     printed)  # fmt: skip
    assert (out / "unreadable.txt").read_text().strip().endswith("class1/7.png")
    assert json.loads((out / "index.json").read_text())["count"] == 119


def test_more_than_one_percent_unreadable_stops_and_keeps_the_work(
    setup, larger_gallery, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(index_cli, "CHUNK", 40)
    gallery = with_broken(larger_gallery, tmp_path / "gallery", ["class0/3.png", "class2/4.png"])
    out = tmp_path / "index"
    assert run_index(setup["checkpoint"], "--images", gallery, "--out", out) == 2
    err = capsys.readouterr().err
    error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "2 of 120 images could not be read (more than 1%)" in error
    assert "run the same command again (what was embedded is kept)" in error
    assert not (out / "index.json").exists() and list((out / ".partial").glob("chunk-*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("not a checkpoint", "is not a readable gca_pyg checkpoint"),
        ("no config", "holds no config"),
        ("empty folder", "holds no images"),
        ("another checkpoint", "holds an index embedded with another checkpoint"),
        ("not an index", "is not empty"),
    ],
)
def test_mistakes_are_one_line_and_overwrite_nothing(setup, tmp_path, capsys, case, message):
    checkpoint, images, out = setup["checkpoint"], setup["gallery"], setup["out"]
    if case == "not a checkpoint":
        checkpoint = tmp_path / "weights.pt"
        checkpoint.write_bytes(b"\x00garbage")
    elif case == "no config":
        checkpoint = tmp_path / "weights.pt"
        torch.save({"format_version": 1, "model": {}}, checkpoint)
    elif case == "empty folder":
        images = tmp_path / "empty"
        (images / "sub").mkdir(parents=True)
    elif case == "another checkpoint":
        checkpoint = setup["other"]
    else:
        out = tmp_path / "notes"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert run_index(checkpoint, "--images", images, "--out", out, "--append") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(out) == before and not (out / ".partial").exists()


def test_retriever_in_python_adds_searches_saves_and_loads(setup, tmp_path):
    gallery = setup["gallery"]
    retriever = Retriever.from_checkpoint(setup["checkpoint"])
    paths = sorted(gallery.rglob("*.png"))
    skipped = retriever.add(paths[:8], labels=[p.parent.name for p in paths[:8]])
    assert skipped == []
    picture = Image.open(paths[8]).convert("RGB")
    tensor = torch.from_numpy(np.array(Image.open(paths[9]).convert("RGB"))).permute(2, 0, 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    assert retriever.add([picture, tensor, broken], labels=["a", "b", "c"]) == [str(broken)]
    assert len(retriever) == 10 and retriever.paths[8:] == ["image-8", "image-9"]

    results = retriever.search([paths[0], picture], k=3)
    assert results[0].paths[0] == str(paths[0]) and results[0].labels[0] == "class0"
    assert results[1].paths[0] == "image-8" and results[1].labels[0] == "a"
    assert results[0].scores[0] == pytest.approx(1.0, abs=1e-5)
    # The image from memory and the same file embed alike (one transform for both).
    twin = retriever.search([paths[8]], k=1)[0]
    assert twin.paths == ["image-8"] and twin.scores[0] == pytest.approx(1.0, abs=1e-5)

    saved = retriever.save(tmp_path / "index")
    loaded = Retriever.load(saved)
    again = loaded.search([paths[0], picture], k=3)
    for before, after in zip(results, again):
        assert before.paths == after.paths and before.labels == after.labels
        np.testing.assert_allclose(before.scores, after.scores, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivf-sq8"])
def test_an_approximate_index_is_calibrated_reordered_and_extended(setup, tmp_path, kind):
    retriever = Retriever.from_checkpoint(setup["checkpoint"], index=kind)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16))
    rows = centres[rng.integers(0, 40, 2000)] + 0.3 * rng.standard_normal((2000, 16))
    names = [f"row-{i}" for i in range(2000)]
    retriever.add_embeddings(rows, names, [None] * 2000)
    result = retriever.search_embeddings(rows[:5], 1, names[:5])
    assert retriever.settings.kind == kind and retriever.settings.recall >= 0.95
    # The held-out rows went last; every item keeps its own name and finds itself.
    assert sorted(retriever.paths) == sorted(names) and retriever.paths != names
    assert [r.paths[0] for r in result] == names[:5]
    saved = Retriever.load(retriever.save(tmp_path / "index"))
    assert saved.settings == retriever.settings
    if kind == "ivf-sq8":  # re-ranked from embeddings.npy, memory-mapped: exact scores
        assert saved.settings.rerank == 10 and isinstance(saved.embeddings, np.memmap)
        (found,) = saved.search_embeddings(rows[7:8], 3, ["q"])
        expected = saved.embeddings[found.ids] @ (rows[7] / np.linalg.norm(rows[7]))
        np.testing.assert_allclose(found.scores, expected, atol=1e-5)
    saved.add_embeddings(rows[:3] * 2, ["new-0", "new-1", "new-2"], ["x", None, "z"])
    (found,) = saved.search_embeddings(rows[1:2], 2, ["q"])
    assert set(found.paths) == {"row-1", "new-1"}


def test_an_interrupted_save_is_finished_by_the_next_load(setup, tmp_path, monkeypatch):
    retriever = Retriever.load(setup["out"])
    out = retriever.save(tmp_path / "index")
    retriever.add([setup["gallery"] / "class0" / "0.png"], labels=["again"])
    moves = []
    original = os.replace

    def crash_after_two(source, target):
        if str(source).find(".next") >= 0:
            moves.append(source)
            if len(moves) == 3:
                raise KeyboardInterrupt  # the power fails while the files move into place
        original(source, target)

    monkeypatch.setattr(gca_pyg.retriever.os, "replace", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        retriever.save(out)
    monkeypatch.undo()
    assert json.loads((out / "index.json").read_text())["count"] == 12  # the old manifest
    loaded = Retriever.load(out)  # finishes the move: the new version, whole
    assert len(loaded) == 13 and loaded.labels[-1] == "again"
    assert not (out / ".next").exists()


def test_search_mistakes_are_one_line(setup, tmp_path, capsys):
    assert search_cli.main([str(tmp_path), str(setup["gallery"])]) == 2
    assert "holds no index (index.json); build one with python -m gca_pyg.index" in (
        capsys.readouterr().err
    )
    assert search_cli.main([str(setup["out"]), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.png: no such file or folder" in err
    assert search_cli.main([str(tmp_path / "no-index"), str(setup["gallery"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-index does not exist; give the --out folder" in err


def test_two_processes_embed_in_shares_and_rank_0_writes(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "index"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "gca_pyg.index", str(setup["checkpoint"]),
               "--images", str(setup["gallery"]), "--label-folders", "--out", str(out),
               "--workers", "0"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stderr
    assert "embedded in 2 processes: 6 + 6 images" in done.stdout
    assert done.stdout.count("indexed 12 new image(s)") == 1  # rank 0 alone writes and prints
    assert (out / "items.csv").read_text() == (setup["out"] / "items.csv").read_text()
    np.testing.assert_allclose(
        np.load(out / "embeddings.npy"), np.load(setup["out"] / "embeddings.npy"), atol=1e-5
    )


def write_items(path, names, labels):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(zip(names, labels))
    return path


def test_embeddings_made_elsewhere_index_and_search_without_a_model(tmp_path, capsys):
    """Rows of another process (float64, not normalised), named by a CSV: a folder without a
    model, searched with vectors; an image query is one line saying so."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 16)) * 3
    np.save(tmp_path / "emb.npy", rows)
    names = [f"shop/{i}.jpg" for i in range(300)]
    write_items(tmp_path / "items.csv", names, [f"c{i % 7}" if i % 5 else "" for i in range(300)])
    out = tmp_path / "index"
    assert run_index("--embeddings", tmp_path / "emb.npy", "--items", tmp_path / "items.csv",
                     "--out", out) == 0  # fmt: skip
    assert "holds 300 images, 16-d embeddings, Flat (exact)" in capsys.readouterr().out
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["checkpoint"] is None and manifest["dim"] == 16
    assert not (out / "model.pt").exists()
    retriever = Retriever.load(out)
    assert retriever.paths == names and retriever.labels[:3] == [None, "c1", "c2"]
    np.testing.assert_allclose(
        retriever.embeddings, rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6
    )

    np.save(tmp_path / "q.npy", rows[[4, 9]].astype(np.float32))
    assert search_cli.main([str(out), "--vectors", str(tmp_path / "q.npy"), "-k", "2",
                            "--json"]) == 0  # fmt: skip
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == ["q.npy:0", "q.npy:1"]
    assert [r["neighbors"][0]["path"] for r in results] == ["shop/4.jpg", "shop/9.jpg"]
    assert results[0]["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    assert search_cli.main([str(out), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model to embed images: search it with vectors" in err
    with pytest.raises(gca_pyg.errors.ConfigError, match="no model"):
        retriever.search([image])


def test_embeddings_with_their_checkpoint_make_the_folder_images_make(setup, tmp_path, capsys):
    """The rows and items.csv of an index folder, indexed again with the checkpoint that
    embedded them: the same folder, searched with images as the first is."""
    straight = setup["out"]
    out = tmp_path / "again"
    assert run_index(setup["checkpoint"], "--embeddings", straight / "embeddings.npy", "--items",
                     straight / "items.csv", "--out", out) == 0  # fmt: skip
    capsys.readouterr()
    assert (out / "items.csv").read_text() == (straight / "items.csv").read_text()
    np.testing.assert_allclose(
        np.load(out / "embeddings.npy"), np.load(straight / "embeddings.npy"), atol=1e-6
    )
    ours, theirs = (json.loads((f / "index.json").read_text()) for f in (out, straight))
    assert ours["checkpoint"] == theirs["checkpoint"] and ours["index"] == theirs["index"]
    query = setup["gallery"] / "class1" / "2.png"
    (result,) = Retriever.load(out).search([query], k=3)
    (expected,) = Retriever.load(straight).search([query], k=3)
    assert result.paths == expected.paths and result.paths[0] == str(query.resolve())


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "row 3 holds NaN or infinite values; fix or drop it"),
        ("one row", "are an array of shape (16,); expected (rows, dim)"),
        ("integers", "hold int64 values; expected floating-point embeddings"),
        ("missing", "emb.npy: no such file"),
        ("not numpy", "is not a readable .npy file"),
        ("suffix", "use a .npy, .npz, .pt file"),
        ("items count", "has 11 rows and --embeddings"),
        ("items columns", "is not a CSV with a path column"),
        ("checkpoint size", "holds 8-d rows and"),
    ],
)
def test_bad_embeddings_are_one_line_and_write_nothing(setup, tmp_path, capsys, case, message):
    rows = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)
    emb, items, checkpoint = tmp_path / "emb.npy", None, []
    if case == "nan":
        rows[3, 5] = np.nan
    elif case == "one row":
        rows = rows[0]
    elif case == "integers":
        rows = np.ones((12, 16), np.int64)
    elif case == "checkpoint size":
        rows, checkpoint = rows[:, :8], [setup["checkpoint"]]
    if case == "suffix":
        emb = tmp_path / "emb.txt"
        emb.write_text("1 2 3")
    elif case == "not numpy":
        emb.write_bytes(b"\x93NUMPY garbage")
    elif case != "missing":
        np.save(emb, rows)
    if case == "items count":
        items = write_items(tmp_path / "items.csv", [f"{i}.jpg" for i in range(11)], [""] * 11)
    elif case == "items columns":
        items = tmp_path / "items.csv"
        items.write_text("file,label\na.jpg,x\n")
    out = tmp_path / "index"
    extra = ["--items", items] if items else []
    assert run_index(*checkpoint, "--embeddings", emb, *extra, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_a_compressed_index_says_what_its_recall_was_measured_on(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 16))
    rows = (centres[rng.integers(0, 60, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(
        np.float32
    )
    np.save(tmp_path / "emb.npy", rows)
    out = tmp_path / "index"
    assert run_index("--embeddings", tmp_path / "emb.npy", "--index", "ivf-sq8", "--out", out) == 0
    printed = capsys.readouterr().out
    assert re.search(r"holds 3,000 images, 16-d embeddings, IVF\d+,SQ8 \(nprobe \d+; its best "
                     r"10×k re-ranked exactly\)", printed)  # fmt: skip
    assert re.search(
        r"recall@10 against exact search: 0\.9\d+ ± 0\.0\d+ \(one standard error\) on 300 gallery "
        r"images held out of the index while it was measured .*less 2 standard errors reaches "
        r"the target 0\.95",
        printed,
    )
    retriever = Retriever.load(out)
    assert retriever.settings.codes == "SQ8" and retriever.settings.rerank == 10
    np.save(tmp_path / "q.npy", rows[:20])
    assert search_cli.main([str(out), "--vectors", str(tmp_path / "q.npy"), "-k", "1",
                            "--json"]) == 0  # fmt: skip
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["neighbors"][0]["path"] for r in results] == [f"emb.npy:{i}" for i in range(20)]
    assert all(r["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5) for r in results)
