"""python -m gca_pyg.export: the embedding model as TorchScript and ONNX, run without gca_pyg's
model code, against PyTorch, at two batch sizes through one file."""

import json
import re
import warnings

import numpy as np
import pytest
import torch

from gca_pyg.app import export as export_cli
from gca_pyg.checkpoint import open_checkpoint
from gca_pyg.pipeline import inference_transform
from gca_pyg.retriever import Retriever

from retrieval_fixtures import make_checkpoint, write_gallery


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export") / "run" / "last.pt")


def images(batch, seed):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def expected(checkpoint, batch):
    module = export_cli.embedding_model(open_checkpoint(checkpoint))
    with torch.no_grad():
        return module(batch).numpy()


def load_torchscript(path, extra_files=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        return torch.jit.load(str(path), _extra_files=extra_files)


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_the_exported_file_matches_pytorch_at_two_batch_sizes(checkpoint, tmp_path, capsys, format):
    if format == "onnx":
        pytest.importorskip("onnxscript")
        onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / f"embedder.{'onnx' if format == 'onnx' else 'pt'}"
    assert export_cli.main([str(checkpoint), "--format", format, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    shown = dict(re.findall(r"batch (\d+): ([\d.e+-]+)", printed))
    assert set(shown) == {"1", "3"} and max(float(v) for v in shown.values()) < 1e-4
    if format == "onnx":  # one self-contained file, no weights left beside it
        assert sorted(path.name for path in out.parent.iterdir()) == [out.name]
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda batch: session.run(None, {"images": batch.numpy()})[0]  # noqa: E731
        info = json.loads(session.get_modelmeta().custom_metadata_map["gca_pyg"])
    else:
        extra = {"gca_pyg.json": ""}
        module = load_torchscript(out, extra)
        run = lambda batch: module(batch).detach().numpy()  # noqa: E731
        info = json.loads(extra["gca_pyg.json"])
    for batch, seed in ((2, 7), (5, 8)):  # sizes the export was not traced with
        x = images(batch, seed)
        found = run(x)
        difference = np.abs(found - expected(checkpoint, x)).max()
        print(f"{format}, batch {batch}: max |difference| from PyTorch {difference:.2e}")
        assert found.shape == (batch, 16) and difference < 1e-4
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-5)
    assert info["input"]["shape"] == ["N", 3, 32, 32]
    assert info["preprocessing"] == {
        "resize": 36,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def test_the_exported_model_with_its_preprocessing_embeds_as_the_retriever(checkpoint, tmp_path):
    gallery = write_gallery(tmp_path / "gallery", classes=1)
    paths = sorted(gallery.rglob("*.png"))
    out = tmp_path / "embedder.pt"
    assert export_cli.main([str(checkpoint), "--out", str(out), "--no-verify"]) == 0
    run = open_checkpoint(checkpoint)
    from PIL import Image

    batch = torch.stack(
        [inference_transform(run.config)(Image.open(p).convert("RGB")) for p in paths]
    )
    exported = load_torchscript(out)(batch).detach().numpy()
    retriever = Retriever.from_checkpoint(checkpoint)
    embedded, readable = retriever.embedder.embed(paths)
    assert readable.all()
    # The retriever embeds in its config's precision: bf16 autocast where the CPU has native bf16
    # (the export is fp32), to bf16's three significant digits.
    bf16 = retriever.embedder.precision == "bf16"
    np.testing.assert_allclose(exported, embedded, atol=1e-2 if bf16 else 1e-5)


def test_a_mismatch_is_reported_as_an_error(checkpoint, tmp_path, monkeypatch, capsys):
    """The check is real: a file that computes something else fails it."""
    original = export_cli.run_exported
    monkeypatch.setattr(
        export_cli, "run_exported", lambda *args: original(*args) + 1e-3
    )  # a different model
    assert export_cli.main([str(checkpoint), "--out", str(tmp_path / "e.pt")]) == 2
    err = capsys.readouterr().err
    assert "differs from PyTorch by more than 0.0001" in err
