"""EdgeNodeConv against PyG's edge-aware layers on tasks whose answer is in the edge features.

The graphs: random undirected graphs from PyG's ``FakeDataset`` (no download; molecule-sized:
about 24 nodes of degree 4), 8 node channels and 4 edge channels. A node's *colour* is the argmax
of its first 4 channels; an edge's *strength* is its first channel (symmetric: both directions
carry the mean of the two rows ``FakeDataset`` drew). Three tasks (``--task``):

- ``node`` ("heaviest bond"): each node must name the colour of the neighbour it shares its
  strongest edge with: 4 classes, chance 25 %. Node features alone cannot answer (colours are
  independent), and neighbour features without the edges only tell the plurality colour among the
  neighbours — which the "GATv2Conv without edge features" row measures — so what a layer does
  with the edge features is what is compared.
- ``graph``: each graph is labelled with the colour found most often across its nodes'
  strongest edges (the node task's answers, counted): 4 classes; node outputs are mean-pooled
  (``global_mean_pool``).
- ``edge``: each edge is labelled 1 if it is the strongest edge of either of its end points (2
  classes; the share of the majority class is printed). EdgeNodeConv answers from its edge output
  through a linear head; the node-only layers through a two-layer MLP on ``[h_i + h_j, e_ij]``, as
  PyG users build one (a linear head could not compare the edge with its end points).

Every model is two layers and a head (for EdgeNodeConv, the ready stack
``gca_pyg.nn.EdgeNodeGNN``), hidden widths chosen so that all have (about) the parameter count of
the paper's EdgeNodeConv model; trained with Adam on mini-batches of graphs through PyG's
``DataLoader``. It prints test accuracy (mean ± sd over the seeds, and each seed's), seconds per
training epoch and the memory of one training step: the peak allocated on CUDA; on a CPU, where
PyTorch keeps no allocation peak, the activations saved for the backward pass (deduplicated by
storage), which is the part of training memory that depends on the layer::

    python examples/edge_task.py  # the node task: 3 seeds, 7 models and a control
    python examples/edge_task.py --task edge --epochs 60
    python examples/edge_task.py --epochs 2 --seeds 0 --graphs 40
"""

import argparse
import functools
import random
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import MLP, GATv2Conv, GINEConv, TransformerConv, global_mean_pool
from torch_geometric.utils import scatter, to_undirected

from gca_pyg.nn import EdgeNodeGNN

NODE_CHANNELS, EDGE_CHANNELS, COLOURS = 8, 4, 4


def heaviest_bond_target(data: Data) -> Data:
    """Symmetric edge features, and y: the colour of the neighbour across the strongest edge
    (-1 for a node without neighbours, left out of loss and accuracy)."""
    edge_index, edge_attr = to_undirected(data.edge_index, data.edge_attr, reduce="mean")
    source, target = edge_index
    strength = edge_attr[:, 0]
    strongest = scatter(strength, target, 0, dim_size=data.num_nodes, reduce="max")
    is_strongest = strength == strongest[target]
    colour = data.x[:, :COLOURS].argmax(dim=1)
    y = torch.full((data.num_nodes,), -1, dtype=torch.long)
    y[target[is_strongest]] = colour[source[is_strongest]]
    return Data(x=data.x, edge_index=edge_index, edge_attr=edge_attr, y=y)


def most_common_bond_target(data: Data) -> Data:
    """One label per graph: the colour found most often across its nodes' strongest edges (the
    node task's answers, counted; the smallest colour among ties)."""
    data = heaviest_bond_target(data)
    answers = data.y[data.y >= 0]
    data.y = torch.bincount(answers, minlength=COLOURS).argmax().view(1)
    return data


def strongest_edge_target(data: Data) -> Data:
    """One label per edge: 1 if it is the strongest edge of either end point (symmetric)."""
    data = heaviest_bond_target(data)
    source, target = data.edge_index
    strength = data.edge_attr[:, 0]
    strongest = scatter(strength, target, 0, dim_size=data.num_nodes, reduce="max")
    data.y = ((strength == strongest[target]) | (strength == strongest[source])).long()
    return data


TASKS = {
    "node": (heaviest_bond_target, COLOURS),
    "graph": (most_common_bond_target, COLOURS),
    "edge": (strongest_edge_target, 2),
}


def dataset(num_graphs: int, seed: int, task: str = "node") -> list[Data]:
    random.seed(seed)  # FakeDataset draws the graphs' sizes with Python's random
    torch.manual_seed(seed)
    fake = FakeDataset(
        num_graphs=num_graphs,
        avg_num_nodes=24,
        avg_degree=4,
        num_channels=NODE_CHANNELS,
        edge_dim=EDGE_CHANNELS,
        num_classes=0,
        is_undirected=True,
    )
    make_target = TASKS[task][0]
    return [make_target(data) for data in fake if task != "graph" or data.num_edges > 0]


def edge_node(
    hidden: int, edge_attention: str = "none", heads: int = 4, task: str = "node"
) -> torch.nn.Module:
    """Two EdgeNodeConv layers and a linear head: the ready stack. Node and graph tasks read its
    node output (the last layer's edge update is skipped), the edge task its edge output."""
    classes = TASKS[task][1]
    stack = EdgeNodeGNN(
        NODE_CHANNELS,
        hidden,
        num_layers=2,
        out_channels=None if task == "edge" else classes,
        edge_dim=EDGE_CHANNELS,
        edge_out_channels=classes if task == "edge" else 0,
        heads=heads,
        edge_attention=edge_attention,
    )
    return StackOutput(stack, task)


class StackOutput(torch.nn.Module):
    def __init__(self, stack: EdgeNodeGNN, task: str):
        super().__init__()
        self.stack, self.task = stack, task

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch=None) -> Tensor:
        x, edge_attr = self.stack(x, edge_index, edge_attr)
        if self.task == "edge":
            return edge_attr
        return global_mean_pool(x, batch) if self.task == "graph" else x


class NodeConvNet(torch.nn.Module):
    """Two PyG layers that update the nodes only (the edges keep their input features), and the
    task's linear head."""

    def __init__(self, make_conv, hidden: int, uses_edges: bool = True, task: str = "node"):
        super().__init__()
        self.conv1, self.conv2 = make_conv(NODE_CHANNELS, hidden), make_conv(hidden, hidden)
        classes = TASKS[task][1]
        if task == "edge":  # an MLP: the edge's strength must be compared with its end points'
            self.classifier = MLP([hidden + EDGE_CHANNELS, hidden, classes], norm=None)
        else:
            self.classifier = torch.nn.Linear(hidden, classes)
        self.uses_edges, self.task = uses_edges, task

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch=None) -> Tensor:
        edges = (edge_attr,) if self.uses_edges else ()
        x = F.elu(self.conv1(x, edge_index, *edges))
        x = F.elu(self.conv2(x, edge_index, *edges))
        if self.task == "edge":  # symmetric in the two end points, as the label is
            source, target = edge_index
            return self.classifier(torch.cat([x[source] + x[target], edge_attr], dim=1))
        if self.task == "graph":
            x = global_mean_pool(x, batch)
        return self.classifier(x)


def transformer(hidden: int, heads: int = 4, task: str = "node") -> NodeConvNet:
    return NodeConvNet(
        lambda i, o: TransformerConv(i, o // heads, heads=heads, edge_dim=EDGE_CHANNELS),
        hidden,
        task=task,
    )


def gatv2(hidden: int, heads: int = 4, uses_edges: bool = True, task: str = "node") -> NodeConvNet:
    edge_dim = EDGE_CHANNELS if uses_edges else None
    return NodeConvNet(
        lambda i, o: GATv2Conv(i, o // heads, heads=heads, edge_dim=edge_dim),
        hidden,
        uses_edges,
        task,
    )


def gine(hidden: int, task: str = "node") -> NodeConvNet:
    return NodeConvNet(
        lambda i, o: GINEConv(MLP([i, o, o], norm=None), edge_dim=EDGE_CHANNELS), hidden, task=task
    )


MODELS = {
    "EdgeNodeConv (the paper's layer)": edge_node,
    **{
        f"EdgeNodeConv(edge_attention={option})": functools.partial(
            edge_node, edge_attention=option
        )
        for option in ("key_value", "bias", "gate")
    },
    "TransformerConv(edge_dim)": transformer,
    "GINEConv": gine,
    "GATv2Conv(edge_dim)": gatv2,
    "GATv2Conv, no edge features (control)": functools.partial(gatv2, uses_edges=False),
}


@functools.cache
def probe_graph() -> Data:
    """Three nodes and both directions of two edges: enough for every parameter to be used."""
    edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    return Data(
        x=torch.randn(3, NODE_CHANNELS),
        edge_index=edge_index,
        edge_attr=torch.rand(4, EDGE_CHANNELS),
    )


def num_parameters(model: torch.nn.Module) -> int:
    """The parameters that take part in the output (a gradient reaches them)."""
    graph = probe_graph()
    model(graph.x, graph.edge_index, graph.edge_attr).square().sum().backward()
    return sum(parameter.numel() for parameter in model.parameters() if parameter.grad is not None)


def matched_width(build, target: int, step: int = 4) -> int:
    """The hidden width (a multiple of `step`, for the heads) whose model is closest to `target`
    parameters: a bisection, since the count grows with the width."""
    low, high = 1, 64  # in steps
    while low < high:
        middle = (low + high) // 2
        if num_parameters(build(middle * step)) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [width * step for width in {max(low - 1, 1), low}]
    return min(candidates, key=lambda width: abs(num_parameters(build(width)) - target))


def accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            known = batch.y >= 0
            logits = model(batch.x, batch.edge_index, batch.edge_attr, batch.batch)
            prediction = logits.argmax(dim=1)
            correct += int((prediction[known] == batch.y[known]).sum())
            total += int(known.sum())
    return correct / total


def training_step(model, batch, optimizer) -> Tensor:
    known = batch.y >= 0
    logits = model(batch.x, batch.edge_index, batch.edge_attr, batch.batch)
    loss = F.cross_entropy(logits[known], batch.y[known])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def step_memory_mb(model, batch, optimizer, device: torch.device) -> float:
    """Peak allocated memory of one training step on CUDA; saved activations on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        training_step(model, batch, optimizer)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    storages = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training_step(model, batch, optimizer)
    return sum(storages.values()) / 2**20


def run(build, width, seed, graphs, epochs, batch_size, device, task="node") -> dict:
    train_set = dataset(graphs, 1000 + seed, task)
    test_set = dataset(graphs // 2, 2000 + seed, task)
    torch.manual_seed(seed)
    model = build(width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    seconds = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for batch in train_loader:
            training_step(model, batch.to(device), optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    memory = step_memory_mb(model.train(), next(iter(train_loader)).to(device), optimizer, device)
    test_accuracy = accuracy(model, DataLoader(test_set, batch_size=batch_size), device)
    return {"accuracy": test_accuracy, "seconds": sum(seconds) / len(seconds), "memory": memory}


TASK_TITLES = {
    "node": "node task: the colour across the strongest edge",
    "graph": "graph task: the colour most often across the nodes' strongest edges",
    "edge": "edge task: the strongest edge of either end point",
}


def majority_share(task: str, graphs: int, seeds: list[int]) -> float:
    """The test accuracy of always answering the most frequent class (pooled over the seeds)."""
    labels = torch.cat(
        [data.y for seed in seeds for data in dataset(graphs // 2, 2000 + seed, task)]
    )
    labels = labels[labels >= 0]
    return torch.bincount(labels).max().item() / labels.numel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="node")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--graphs", type=int, default=200, help="training graphs (test: half)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=16, help="the paper's EdgeNodeConv's width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="(default: all)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    reference = "EdgeNodeConv (the paper's layer)"
    target = num_parameters(MODELS[reference](args.hidden, task=args.task))
    memory_kind = "peak MB" if device.type == "cuda" else "saved MB"
    print(
        f"{TASK_TITLES[args.task]} (majority class "
        f"{100 * majority_share(args.task, args.graphs, args.seeds):.1f} %); {args.graphs} "
        f"training graphs, {args.epochs} epochs, seeds {args.seeds}, {device}, "
        f"{torch.get_num_threads()} threads; parameters matched to the paper's EdgeNodeConv's "
        f"{target}"
    )
    print(
        f"| model | width | parameters | test accuracy | per seed | s / epoch | "
        f"{memory_kind} / step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        build = functools.partial(MODELS[name], task=args.task)
        width = args.hidden if name == reference else matched_width(build, target)
        results = [
            run(build, width, seed, args.graphs, args.epochs, args.batch_size, device, args.task)
            for seed in args.seeds
        ]
        accuracies = torch.tensor([result["accuracy"] for result in results]) * 100
        spread = accuracies.std().item() if len(results) > 1 else 0.0
        seconds = sum(result["seconds"] for result in results) / len(results)
        memory = sum(result["memory"] for result in results) / len(results)
        per_seed = ", ".join(f"{value:.1f}" for value in accuracies.tolist())
        print(
            f"| {name} | {width} | {num_parameters(build(width))} | "
            f"{accuracies.mean().item():.1f} ± {spread:.1f} % | {per_seed} | {seconds:.2f} | "
            f"{memory:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
