"""python -m gca_pyg.report: the report of a tiny demo run, its parts, how it looks in a browser."""

import re
import shlex
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from gca_pyg.app import report
from gca_pyg.app import train as train_cli
from gca_pyg.checkpoint import load_checkpoint

from browser import CHROMIUM, FLAGS, SKIP_REASON

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

# The demo recipe shrunk to one quick epoch: 50 steps of 30 classes x 2 images, a small net.
TINY_DEMO = [
    "model.embedding_size=16",
    "net.heads=1",
    "net.num_layers=1",
    "optim.warmup_epochs=0",
    "optim.epochs=1",
    "data.classes_per_batch=30",
    "data.samples_per_class=2",
    "eval.batch_size=500",
]
SECTIONS = ("summary", "curves", "map", "retrieval", "worst-classes")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A one-epoch demo run and its report (its curves read log.jsonl, so one epoch is enough)."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GCA_PYG_CACHE", str(root / "cache"))
        settings = TINY_DEMO + [f"train.output_dir={root / 'runs'}"]
        assert train_cli.main(["demo"] + [a for s in settings for a in ("--set", s)]) == 0
        (run_dir,) = (root / "runs").iterdir()
        command = shlex.split(report.report_command(run_dir))
        assert command[:3] == ["python", "-m", "gca_pyg.report"]
        assert report.main(command[3:] + ["--max-points", "400"]) == 0
        yield run_dir


class _Page(HTMLParser):
    """The ids, image sources, link targets, thumbnails and text of a page."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.images, self.links, self.thumbs, self.text = set(), [], [], [], []
        self._thumb = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("a", "link", "script") and ("href" in attrs or "src" in attrs):
            self.links.append(attrs.get("href") or attrs.get("src"))
        if tag == "div" and "thumb" in attrs.get("class", "").split():
            self._thumb = (attrs["class"].split()[1], attrs["data-class"])
            self.thumbs.append(self._thumb)

    def handle_data(self, data):
        self.text.append(data)


def test_report_holds_every_section_and_every_image_it_links(demo_run):
    out = demo_run / "report"
    page = _Page((out / "index.html").read_text(encoding="utf-8"))
    assert set(SECTIONS) <= page.ids
    for src in page.images:
        assert not re.match(r"^[a-z]+:|^//", src), f"{src} is not a local file"
        with Image.open(out / src) as image:  # exists and decodes
            assert min(image.size) > 8, src
    # Self-contained: no script, stylesheet or font from a server; links stay inside the page.
    assert all(link.startswith("#") for link in page.links), page.links
    text = " ".join(page.text)
    # The config, and the metrics of the checkpoint as training logged them.
    last = load_checkpoint(demo_run)["last_metrics"]
    assert "classes_per_batch: 30" in text and "small_cnn" in text
    assert f"{100 * last['recall@1']:.2f}" in text and f"{100 * last['map@r']:.2f}" in text
    # A curve for each group of log.jsonl keys the run wrote.
    for title in ("Metric losses", "Generator losses", "Learning rates", "Test retrieval (%)"):
        name = "curve-" + "".join(c if c.isalnum() else "_" for c in title.lower()) + ".png"
        assert name in page.images, title
    assert "embedding-map.png" in page.images


def test_retrieval_gallery_frames_neighbours_by_class(demo_run):
    page = _Page((demo_run / "report" / "index.html").read_text(encoding="utf-8"))
    rows = [page.thumbs[i : i + 9] for i in range(0, len(page.thumbs), 9)]
    assert len(rows) == report.NUM_QUERIES
    classes = set()
    for (kind, query_class), *neighbours in rows:
        assert kind == "query"
        classes.add(query_class)
        for kind, found in neighbours:
            assert kind == ("same" if found == query_class else "other")
    assert len(classes) > 1
    kinds = [kind for row in rows for kind, _ in row[1:]]
    assert "same" in kinds and "other" in kinds  # a one-epoch model finds some, misses some
    # The worst classes follow the gallery: ten of them, each with a thumbnail and its R@1.
    worst = re.findall(
        r'<div class="card" data-class="[^"]+"><img src="([^"]+)".*?R@1 ([\d.]+)%',
        (demo_run / "report" / "index.html").read_text(encoding="utf-8"),
    )
    assert len(worst) == report.NUM_WORST_CLASSES
    recalls = [float(value) for _, value in worst]
    assert recalls == sorted(recalls)


def test_nearest_neighbours_never_return_the_query_itself():
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    found = report.nearest_neighbours(gallery, 2)
    assert found.tolist() == [[1, 3], [0, 3], [3, 1], [2, 1], [2, 3]]
    found = report.nearest_neighbours(gallery, 1, query=np.array([[0.0, 2.0]]))
    assert found.tolist() == [[2]]  # a separate query set may retrieve any gallery row


def test_per_class_recall_at_1_and_the_class_mistaken_for():
    query_labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3])
    first_labels = np.array([0, 1, 2, 2, 1, 1, 0, 1, 1])
    valid = np.array([True] * 8 + [False])  # class 3 has nothing to find
    result = report.per_class_recall_at_1(query_labels, first_labels, valid, num_classes=4)
    np.testing.assert_allclose(result.recall[:3], [1 / 4, 1.0, 0.0])
    assert np.isnan(result.recall[3])
    assert result.queries.tolist() == [4, 2, 2, 0]
    assert result.confused_with.tolist() == [2, -1, 0, -1]  # class 2: 0 and 1 tie, 0 first
    assert result.confused_count.tolist() == [2, 0, 1, 0]


def test_curves_plot_the_keys_present_and_skip_the_absent(tmp_path):
    records = [
        {"epoch": 1, "J_m": 3.0, "hardness": 0.2, "custom_stat": 5},
        {"epoch": 2, "J_m": 2.0, "hardness": 0.1, "custom_stat": 4, "test/recall@1": 0.5},
    ]
    written = dict(report.plot_curves(records, tmp_path))
    assert set(written) == {
        "Metric losses",
        "Synthesis schedule",
        "Test retrieval (%)",
        "custom_stat",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written.values())


def test_embedding_map_subsamples_beyond_max_points(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    embeddings = rng.normal(size=(100, 8)) + 4 * np.eye(8)[labels]
    caption = report.embedding_map(embeddings, labels, tmp_path / "map.png", max_points=40)
    assert "a seeded subsample of 40 of the 100 test embeddings" in caption
    with Image.open(tmp_path / "map.png") as image:
        assert image.size == (700, 700)


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an uninstalled package looks like
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "gca-pyg[report]" in err


def test_no_checkpoint_is_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint at" in err


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_the_report_renders_in_headless_chromium(demo_run, tmp_path):
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            *FLAGS,
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,1600",
            f"--screenshot={screenshot}",
            (demo_run / "report" / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    # A rendered page: mostly background, with text, tables and plots in many colours.
    assert pixels.std() > 20
    colours = np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 500
    # The curves sit below the metrics: their rows are not blank.
    assert (pixels[800:1600].std(axis=(1, 2)) > 1).mean() > 0.5


def test_thumbnails_of_image_files_are_small_jpegs(tmp_path):
    from gca_pyg.app.html import ThumbnailFiles
    from gca_pyg.data import ImageFolderByClass, test_transform

    for c in range(4):  # the last two classes test
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        image = Image.new("RGB", (300, 200), (60 * c, 90, 40))
        image.save(tmp_path / "images" / f"class{c}" / "a.png")
    dataset = ImageFolderByClass(tmp_path / "images", "test", test_transform(64, 56))
    (tmp_path / "thumbnails").mkdir()
    thumbnails = ThumbnailFiles(report._raw_items(dataset), tmp_path / "thumbnails", "gallery")
    src, small = thumbnails(0)
    assert src == "thumbnails/gallery-0.jpg" and not small
    with Image.open(tmp_path / src) as image:  # the stored image, not the transformed crop
        assert image.size == (128, 85) and abs(image.getpixel((64, 42))[0] - 120) < 5


def test_the_command_tells_each_step_as_it_starts(demo_run, tmp_path, capsys):
    assert report.main([str(demo_run), "--out", str(tmp_path), "--max-points", "100"]) == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("report: ")]
    expected = ["embedding", "retrieval metrics", "training curves", "the embedding map", "neigh"]
    assert len(steps) == len(expected)
    assert all(step.startswith(f"report: {start}") for step, start in zip(steps, expected)), steps
    assert re.fullmatch(r"report: embedding [\d,]+ test images \(\d+ s\)", steps[0])
