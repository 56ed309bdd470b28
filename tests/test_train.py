"""The training and evaluation commands end to end, in-process (gca_pyg.train / evaluate)."""

import errno
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import gca_pyg.losses
import gca_pyg.trainer
from gca_pyg.app import evaluate as evaluate_cli
from gca_pyg.app import train as train_cli
from gca_pyg.checkpoint import load_checkpoint

from data_layouts import make_cub

TINY = [
    "model.embedding_size=32",
    "net.heads=2",
    "net.num_layers=1",
    "optim.warmup_epochs=0",
    "train.eval_every=1",
    "eval.batch_size=64",
]


def folder_args(root, output, *extra):
    """`folder` recipe shrunk to seconds: 4 train classes × 8 images, batches of 4 × 2."""
    settings = TINY + [
        "data.classes_per_batch=4",
        "data.samples_per_class=2",
        "data.image_size=32",
        "data.resize=36",
        "data.num_workers=0",
        "model.backbone=small_cnn",
        "model.pretrained=none",
        "model.frozen_bn=false",
        "optim.epochs=2",
        f"train.output_dir={output}",
        *extra,
    ]
    return ["folder", "--data-root", str(root)] + [a for s in settings for a in ("--set", s)]


def only_run_dir(output):
    (run_dir,) = list(output.iterdir())
    return run_dir


@pytest.mark.parametrize("metric_loss", ["npair", "proxy_anchor"])
def test_demo_trains_and_reports_on_unseen_classes(tmp_path, monkeypatch, capsys, metric_loss):
    monkeypatch.setenv("GCA_PYG_CACHE", str(tmp_path / "cache"))
    settings = TINY + [
        "optim.epochs=1",
        "data.classes_per_batch=10",
        f"loss.metric={metric_loss}",
        f"train.output_dir={tmp_path}",
    ]
    code = train_cli.main(["demo"] + [a for s in settings for a in ("--set", s)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "retrieval on 100 unseen classes, 3000 images" in out
    for metric in ("R@1", "R@2", "R@4", "R@8", "MAP@R", "RP"):
        assert re.search(rf"^{re.escape(metric)}\s+\|\s+\d+\.\d\d$", out, flags=re.M), metric
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("demo-"))
    for name in ("last.pt", "best.pt", "config.yaml", "log.jsonl", "steps.csv"):
        assert (run_dir / name).is_file(), name
    (record,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert record["J_syn"] > 0 and record["J_gen"] > 0
    proxies = load_checkpoint(run_dir)["model"].get("criterion.proxies")
    if metric_loss == "proxy_anchor":  # one proxy per training class, saved with the model
        assert proxies.shape == (100, 32)
    else:
        assert proxies is None
    if importlib.util.find_spec("tensorboard") is not None:  # an optional extra
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_reproduces_the_numbers_of_training(image_folder, tmp_path, capsys):
    assert train_cli.main(folder_args(image_folder, tmp_path)) == 0
    run_dir = only_run_dir(tmp_path)
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in logged] == [1, 2]
    capsys.readouterr()
    export = tmp_path / "embeddings.npz"
    code = evaluate_cli.main(["--checkpoint", str(run_dir / "last.pt"), "--export", str(export)])
    out, err = capsys.readouterr()
    assert code == 0, err
    printed = dict(re.findall(r"^(R@\d+|MAP@R|RP)\s+\|\s+(\d+\.\d\d)$", out, flags=re.M))
    at_training = logged[-1]
    assert printed["R@1"] == f"{100 * at_training['test/recall@1']:.2f}"
    assert printed["MAP@R"] == f"{100 * at_training['test/map@r']:.2f}"
    assert printed["RP"] == f"{100 * at_training['test/r_precision']:.2f}"
    arrays = np.load(export)
    assert arrays["embeddings"].shape == (32, 32) and arrays["labels"].shape == (32,)


def test_ctrl_c_saves_and_resume_continues_exactly(image_folder, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert train_cli.main(folder_args(image_folder, straight)) == 0
    expected = load_checkpoint(only_run_dir(straight) / "last.pt")

    original_step = gca_pyg.trainer.AlternatingTrainer.training_step
    calls = []

    def interrupted_step(trainer, images, labels):
        logs = original_step(trainer, images, labels)
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during the 3rd of 8 steps
            signal.raise_signal(signal.SIGINT)
        return logs

    monkeypatch.setattr(gca_pyg.trainer.AlternatingTrainer, "training_step", interrupted_step)
    interrupted = tmp_path / "interrupted"
    assert train_cli.main(folder_args(image_folder, interrupted)) == train_cli.INTERRUPTED
    err = capsys.readouterr().err
    run_dir = only_run_dir(interrupted)
    assert f"--resume {run_dir}" in err and "Traceback" not in err
    saved = load_checkpoint(run_dir)
    assert saved["training"]["epoch"] == 0 and saved["batch_in_epoch"] == 3
    monkeypatch.undo()

    assert train_cli.main(["--resume", str(run_dir)]) == 0
    resumed = load_checkpoint(run_dir / "last.pt")
    assert resumed["training"]["epoch"] == 2
    for name, value in expected["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed["model"][name], value), name
        else:  # the generator's schedule state
            assert resumed["model"][name] == value, name
    assert resumed["last_metrics"] == expected["last_metrics"]
    steps = (run_dir / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 8  # a header, then every step once: none repeated, none skipped
    # The epoch's means in log.jsonl cover all of its steps, before and after the resume.
    header, rows = steps[0].split(","), [line.split(",") for line in steps[1:]]
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    straight_log = [
        json.loads(line) for line in (only_run_dir(straight) / "log.jsonl").read_text().splitlines()
    ]
    for name in ("J_m", "J_metric", "J_gen"):
        column = header.index(name)
        first_epoch = [float(row[column]) for row in rows if row[1] == "1"]
        assert len(first_epoch) == 4
        assert logged[0][name] == pytest.approx(sum(first_epoch) / 4, rel=1e-5)
        assert logged[0][name] == pytest.approx(straight_log[0][name], rel=1e-12)


def test_after_a_kill_each_step_and_epoch_is_logged_once(image_folder, tmp_path):
    """SIGKILL in the middle of a later epoch; the resumed run logs from its checkpoint on."""
    command = [
        sys.executable,
        "-m",
        "gca_pyg.train",
        *folder_args(image_folder, tmp_path, "optim.epochs=4"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while time.monotonic() - started < 300:
        found = list(tmp_path.glob("*/steps.csv"))
        if found and len(found[0].read_text().splitlines()) > 1 + 4 + 1:  # into epoch 2
            break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = only_run_dir(tmp_path)
    assert load_checkpoint(run_dir)["training"]["epoch"] >= 1

    assert train_cli.main(["--resume", str(run_dir)]) == 0
    steps = [
        int(line.split(",")[0]) for line in (run_dir / "steps.csv").read_text().splitlines()[1:]
    ]
    assert steps == list(range(1, 17))
    epochs = [
        json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    image_folder, tmp_path, monkeypatch, capsys
):
    original = gca_pyg.losses.NPairLoss.forward
    calls = []

    def exploding(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(gca_pyg.losses.NPairLoss, "forward", exploding)
    assert train_cli.main(folder_args(image_folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"error: J_metric became nan at epoch 2, iteration 2: no update was applied"
        r".*the last good checkpoint is .*last\.pt \(end of epoch 1\)",
        err,
    ), err
    assert "Traceback" not in err
    assert load_checkpoint(only_run_dir(tmp_path))["training"]["epoch"] == 1


def test_no_space_for_a_checkpoint_is_one_clear_error(image_folder, tmp_path, monkeypatch, capsys):
    def full_disk(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_cli.main(folder_args(image_folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "no space left on the device" in err
    assert "Traceback" not in err


def copy_with_broken_images(source, target, broken):
    for folder in source.iterdir():
        (target / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (target / folder.name / image.name).write_bytes(image.read_bytes())
    for name in broken:
        (target / name).write_bytes(b"not an image")
    return target


@pytest.fixture(scope="module")
def larger_folder(tmp_path_factory):
    """8 classes × 26 images: 104 training images, so one broken file is under 1%."""
    root = tmp_path_factory.mktemp("larger")
    for c in range(8):
        (root / f"class{c}").mkdir()
        for i in range(26):
            Image.new("RGB", (32, 32), (30 * c, 7 * i, 100)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_an_unreadable_image_is_substituted_and_reported(larger_folder, tmp_path, capsys):
    root = copy_with_broken_images(larger_folder, tmp_path / "images", ["class1/5.png"])
    with pytest.warns(RuntimeWarning, match=r"unreadable image .*class1/5\.png"):
        assert train_cli.main(folder_args(root, tmp_path / "out", "optim.epochs=1")) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"warning: 1 unreadable training image\(s\) so far, each replaced by another "
        r"image of its class: .*class1/5\.png",
        err,
    ), err
    record = json.loads((only_run_dir(tmp_path / "out") / "log.jsonl").read_text())
    assert record["unreadable_images"] == 1


@pytest.mark.filterwarnings("ignore:unreadable image")
@pytest.mark.parametrize("workers", [0, 2])
def test_more_than_one_percent_unreadable_stops(larger_folder, tmp_path, capsys, workers):
    root = copy_with_broken_images(
        larger_folder, tmp_path / "images", ["class0/3.png", "class2/4.png"]
    )
    code = train_cli.main(folder_args(root, tmp_path / "out", f"data.num_workers={workers}"))
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: 2 of 104 images could not be decoded \(more than 1%\)", err), err
    error_line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert err.rstrip().endswith(error_line) and "Traceback" not in err  # one line, the last


def test_missing_dataset_says_where_it_looked_and_offers_the_demo(tmp_path, capsys):
    assert train_cli.main(["cub", "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "python -m gca_pyg.train demo" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_wrong_counts_name_what_is_off(tmp_path, capsys):
    root = make_cub(tmp_path)
    assert train_cli.main(["cub", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "11,788" in err and "Traceback" not in err


def test_bad_config_lists_valid_keys(capsys):
    assert train_cli.main(["demo", "--set", "optim.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.epoch'" in err and "epochs" in err
    assert train_cli.main([]) == 2
    assert "name a config" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none(capsys):
    assert train_cli.main(["demo", "--set", "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "train.device=auto" in err


def test_evaluate_without_a_checkpoint(tmp_path, capsys):
    assert evaluate_cli.main(["--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_deterministic_kernels_are_what_the_config_says(image_folder, tmp_path, monkeypatch):
    seen = []
    step = gca_pyg.trainer.AlternatingTrainer.training_step

    def recording_step(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(gca_pyg.trainer.AlternatingTrainer, "training_step", recording_step)
    try:
        for flag in (True, False):
            seen.clear()
            output = tmp_path / str(flag)
            args = folder_args(image_folder, output, f"train.deterministic={str(flag).lower()}")
            assert train_cli.main(args) == 0
            assert seen and set(seen) == {flag}
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_error_every_process_meets_is_printed_by_rank_0_alone(
    monkeypatch, capsys, rank, printed
):
    # Under torchrun every process reads the same config: one line, not one per process.
    monkeypatch.setenv("RANK", rank)
    assert train_cli.main(["demo", "--set", "optim.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert ("'optim.epochs'" in err) is printed and err.count("\n") == int(printed)
