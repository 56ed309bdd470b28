"""`torchrun --nproc-per-node 2 -m gca_pyg.train demo`: end to end, Ctrl-C and resume, a process
that dies, a NaN (2 CPU processes, gloo)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gca_pyg.checkpoint import load_checkpoint

TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    "2",
    "-m",
    "gca_pyg.train",
]
# 10 steps of 50 classes x 6 images per epoch, a small net: seconds per epoch.
SMALL = [
    "optim.epochs=1",
    "data.classes_per_batch=50",
    "data.samples_per_class=6",
    "model.embedding_size=32",
    "net.num_layers=1",
    "net.heads=2",
    "eval.batch_size=500",
]


def settings(*extra):
    return [arg for setting in (*SMALL, *extra) for arg in ("--set", setting)]


@pytest.fixture
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "demo-cache"
    return {**os.environ, "GCA_PYG_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def torchrun(args, env, timeout=600):
    return subprocess.run(TORCHRUN + args, env=env, capture_output=True, text=True, timeout=timeout)


def steps_of(run_dir):
    return [
        int(line.split(",")[0]) for line in (run_dir / "steps.csv").read_text().splitlines()[1:]
    ]


def test_two_processes_train_resume_and_evaluate(tmp_path, env):
    result = torchrun(["demo", *settings(f"train.output_dir={tmp_path}")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in 2 processes" in result.stderr
    assert len(re.findall(r"^R@1\s+\|", result.stdout, flags=re.M)) == 1  # rank 0 alone prints
    (run_dir,) = tmp_path.iterdir()
    assert steps_of(run_dir) == list(range(1, 11))

    result = torchrun(["--resume", str(run_dir), "--set", "optim.epochs=2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(run_dir) == list(range(1, 21))
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in logged] == [1, 2]

    evaluated = subprocess.run(
        [sys.executable, "-m", "gca_pyg.evaluate", "--checkpoint", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    printed = dict(re.findall(r"^(R@\d+|MAP@R)\s+\|\s+(\d+\.\d\d)$", evaluated.stdout, flags=re.M))
    assert printed["R@1"] == f"{100 * logged[-1]['test/recall@1']:.2f}"
    assert printed["MAP@R"] == f"{100 * logged[-1]['test/map@r']:.2f}"


def start(args, env):
    return subprocess.Popen(
        TORCHRUN + args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_steps(output, count, process, timeout=300):
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        found = list(output.glob("*/steps.csv"))
        if found and len(found[0].read_text().splitlines()) > count:
            return found[0].parent
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("the run did not reach its steps in time")


def test_ctrl_c_stops_every_process_with_one_save_and_resume_logs_each_step_once(tmp_path, env):
    process = start(["demo", *settings("optim.epochs=2", f"train.output_dir={tmp_path}")], env)
    run_dir = wait_for_steps(tmp_path, 3, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = process.communicate(timeout=300)
    assert err.count("Interrupted in epoch 1") == 1, err[-3000:]
    assert f"--resume {run_dir}" in err
    saved = load_checkpoint(run_dir)
    assert saved["training"]["epoch"] == 0 and 3 <= saved["batch_in_epoch"] < 10
    assert len(saved["rng_per_process"]) == 2

    result = torchrun(["--resume", str(run_dir)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(run_dir) == list(range(1, 21))


def test_a_process_that_dies_stops_the_other(tmp_path, env):
    process = start(["demo", *settings("optim.epochs=5", f"train.output_dir={tmp_path}")], env)
    wait_for_steps(tmp_path, 2, process)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    workers = [int(pid) for pid in children.stdout.split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    process.communicate(timeout=120)  # the survivor does not hang
    assert process.returncode != 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_nan_stops_every_process_with_a_clear_error(tmp_path, env):
    result = torchrun(["demo", *settings("loss.alpha=.nan", f"train.output_dir={tmp_path}")], env)
    assert result.returncode != 0
    # Each process prints the error; their stderr streams interleave with rank 0's progress bar.
    errors = [line for line in result.stderr.splitlines() if "became nan" in line]
    assert errors and all(
        "error: J_metric became nan at epoch 1, iteration 1" in line for line in errors
    )
    assert not re.search(r"^\[rank\d\]: Traceback", result.stderr, flags=re.M)  # no worker crashed
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "last.pt").exists()  # nothing was saved after the NaN


def test_two_processes_train_on_a_sparse_batch_graph_with_memory_nodes(tmp_path, env):
    result = torchrun(
        [
            "demo",
            *settings(f"train.output_dir={tmp_path}", "graph.neighbors=16", "graph.memory=256"),
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert steps_of(run_dir) == list(range(1, 11))
    (record,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = {name: value for name, value in record.items() if name.startswith("J_")}
    assert {"J_syn", "J_gen", "J_div"} <= losses.keys()
    assert all(value == value and abs(value) < 1e6 for value in losses.values()), losses
    assert record["memory_nodes"] > 0  # the steps after the first took memory nodes
    saved = load_checkpoint(run_dir / "last.pt")["training"]["memory"]
    assert saved["labels"].numel() == 256  # ten steps of the whole batch, the last 256 kept
