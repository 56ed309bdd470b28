"""examples/edge_task.py: its target is what it says, the models are matched, and it runs."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch_geometric.data import Data

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "edge_task.py"


def load_example():
    spec = importlib.util.spec_from_file_location("edge_task", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_target_is_the_colour_across_the_strongest_edge():
    example = load_example()
    x = torch.zeros(4, example.NODE_CHANNELS)
    x[torch.arange(4), torch.tensor([2, 0, 3, 1])] = 1.0  # colours 2, 0, 3, 1
    # 0-1 and 0-2, each direction drawn separately: strengths 0.8/1.0 (mean 0.9) and 0.5/0.1.
    edge_index = torch.tensor([[0, 1, 0, 2], [1, 0, 2, 0]])
    edge_attr = torch.rand(4, example.EDGE_CHANNELS)
    edge_attr[:, 0] = torch.tensor([0.8, 1.0, 0.5, 0.1])
    data = example.heaviest_bond_target(Data(x=x, edge_index=edge_index, edge_attr=edge_attr))
    assert data.y.tolist() == [0, 2, 2, -1]  # node 3 has no neighbour
    by_pair = {tuple(pair): row for pair, row in zip(data.edge_index.t().tolist(), data.edge_attr)}
    assert torch.equal(by_pair[(0, 1)], by_pair[(1, 0)])  # symmetric edge features
    assert by_pair[(0, 1)][0].item() == torch.tensor(0.9).item()


def test_the_example_runs_models_of_matched_sizes():
    arguments = ["--epochs", "1", "--seeds", "0", "1", "--graphs", "4"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(
        r"^\| (.+?) \| (\d+) \| (\d+) \| (\d+\.\d) ± (\d+\.\d) % \|", result.stdout, re.M
    )
    assert [row[0] for row in rows] == list(load_example().MODELS)
    assert all(0 <= float(row[3]) <= 100 for row in rows)
    target = int(rows[0][2])  # EdgeNodeConv's parameters; the others are matched to it
    assert all(abs(int(row[2]) - target) < 0.1 * target for row in rows)


def test_a_seed_draws_the_same_graphs_in_every_task():
    example = load_example()
    for task in example.TASKS:
        first, second = example.dataset(6, 3, task), example.dataset(6, 3, task)
        assert [data.num_nodes for data in first] == [data.num_nodes for data in second]
        for a, b in zip(first, second):
            assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.y, b.y)
