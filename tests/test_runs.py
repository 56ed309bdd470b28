"""gca_pyg.runs: the one way from a checkpoint to a model, and a run's logs."""

import json

import pytest
import torch

from gca_pyg.app.runs import RunLog, read_log
from gca_pyg.checkpoint import CheckpointError, open_checkpoint

from retrieval_fixtures import make_checkpoint


def test_a_checkpoint_opens_to_its_config_and_model(tmp_path):
    path = make_checkpoint(tmp_path / "run" / "last.pt")
    run = open_checkpoint(tmp_path / "run", ["eval.batch_size=3"])  # a run folder: its last.pt
    assert run.path == path and run.run_dir == tmp_path / "run" and run.epoch == 1
    assert run.config.eval.batch_size == 3 and run.classes == [
        "train0",
        "train1",
        "train2",
        "train3",
    ]
    model = run.build_model(torch.device("cpu"))
    assert not model.training
    saved = torch.load(path, weights_only=True)["model"]
    assert saved.keys() == model.state_dict().keys()
    for name, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(model.state_dict()[name], value), name
        else:  # the generator's schedule state
            assert model.state_dict()[name] == value, name
    # The fingerprint follows the embedding weights, and only them.
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    assert open_checkpoint(other).embedder_fingerprint() != run.embedder_fingerprint()
    state = torch.load(path, weights_only=True)
    state["model"] = {k: v + 1 if k.startswith("net.") else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "net-changed.pt")
    assert open_checkpoint(tmp_path / "net-changed.pt").embedder_fingerprint() == (
        run.embedder_fingerprint()
    )


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    path = make_checkpoint(tmp_path / "last.pt")
    run = open_checkpoint(path, ["model.embedding_size=32"])
    with pytest.raises(
        CheckpointError, match=r"do not fit the model of its config .*size mismatch"
    ):
        run.build_model(torch.device("cpu"))


def test_a_resumed_log_forgets_what_came_after_its_checkpoint(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 7):
        log.step(step, epoch=(step - 1) // 3 + 1, values={"J_m": 1.0 / step})
    for epoch in (1, 2):
        log.epoch({"epoch": epoch, "J_m": 0.5})
    log.close()
    # The checkpoint was written after step 3, epoch 1; the process then died in epoch 2.
    RunLog(tmp_path, resumed_at=(3, 1)).close()
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,J_m" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert [record["epoch"] for record in read_log(tmp_path)] == [1]
    # Another rank writes nothing.
    RunLog(tmp_path / "rank1", enabled=False).step(1, 1, {"J_m": 1.0})
    assert not (tmp_path / "rank1").exists()
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1}) + '\n{"epo')  # cut by a crash
    with pytest.warns(RuntimeWarning, match="line 2, is not JSON"):
        assert read_log(tmp_path) == [{"epoch": 1}]
