import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gca_pyg
from gca_pyg.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gca_pyg.model import GCAHNG
from gca_pyg.schema import NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer

from tiny_model import TinyBackbone, batch


def test_round_trip_through_a_run_folder(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": 3,
            "config": {"name": "x", "ks": [1, 2]},
        },
        tmp_path / "last.pt",
    )
    state = load_checkpoint(tmp_path)  # a folder means its last.pt
    assert state["epoch"] == 3 and state["config"] == {"name": "x", "ks": [1, 2]}
    assert torch.equal(state["model"]["weight"], model.weight)
    assert list(tmp_path.iterdir()) == [tmp_path / "last.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left.*previous checkpoint there is intact"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*last.pt"):
        load_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable gca_pyg checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a gca_pyg checkpoint"):
        load_checkpoint(foreign)


def test_rng_state_survives_a_checkpoint(tmp_path):
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


DATA = Path(__file__).resolve().parent / "data"


def format_1_record(name: str) -> Path:
    """The file made on a CPU with this one's kernels: ``NAME.pt`` on AVX2, ``NAME.<capability>.pt``
    (the same script with 0.1.0) where wider vector kernels sum in another order."""
    own = DATA / name.replace(".pt", f".{torch.backends.cpu.get_cpu_capability()}.pt")
    return own if own.exists() else DATA / name


def test_a_checkpoint_of_format_1_continues_as_gca_pyg_0_1_0_continued_it(two_threads):
    """format_1.pt is a mid-epoch checkpoint written by gca_pyg 0.1.0, format_1_continued.pt what
    0.1.0 computed from there (tests/data/make_format_1_checkpoint.py wrote both, 2 threads)."""
    state = load_checkpoint(format_1_record("format_1.pt"))
    expected = torch.load(format_1_record("format_1_continued.pt"), weights_only=True)
    assert state["format_version"] == FORMAT_VERSION and expected["version"] == "0.1.0"
    torch.manual_seed(0)
    model = GCAHNG(TinyBackbone(), num_classes=6, embedding_size=16, net=NetConfig(1, 2, 0.1))
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=4), seed=0)
    model.load_state_dict(state["model"])  # strict: every key of the model, none left over
    trainer.load_state_dict(state["training"])
    set_rng_state(state["rng"])
    images, labels = batch()
    logs = [trainer.training_step(images, labels) for _ in range(2)]
    assert trainer.end_epoch() == expected["means"]  # the epoch's means span the checkpoint
    schedule = {"hardness": trainer.hardness, "synthetic_weight": trainer.synthetic_weight}
    assert schedule == expected["schedule"]
    logs.append(trainer.training_step(images, labels))
    assert logs == expected["logs"]  # bit for bit
    assert torch.equal(model.embed(images), expected["embeddings"])


def test_a_checkpoint_of_a_newer_format_is_one_clear_error(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "written_by": "9.9.0"}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"format {FORMAT_VERSION + 1}, written by gca_pyg 9.9.0" in message
    assert "upgrade gca_pyg" in message and "\n" not in message


def test_a_checkpoint_names_the_release_that_wrote_it(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path)
    assert state["written_by"] == gca_pyg.__version__ and state["format_version"] == 2


def test_a_checkpoint_of_format_1_starts_a_run_as_model_init():
    """model.init reads through the checkpoint module: a 0.1.0 file is upgraded as it is read."""
    from gca_pyg.checkpoint import load_initial_weights
    from gca_pyg.config import Config

    path = format_1_record("format_1.pt")
    model = GCAHNG(TinyBackbone(), num_classes=6, embedding_size=16, net=NetConfig(1, 2, 0.1))
    load_initial_weights(model, path, Config())
    expected = load_checkpoint(path)["model"]
    assert "generator.net.lin_in.weight" in expected  # format 1 kept it at net.lin_in.weight
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected[key]), key
