"""A tiny GCA-HNG set-up for the multi-process tests: the same model, batches and trainer in one
process or in each of several (gloo) processes."""

import os
import sys

import torch
import torch.distributed as dist

from gca_pyg.distributed import Context
from gca_pyg.graph import GraphConfig
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LossConfig, NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer

CLASSES, SAMPLES, TRAIN_CLASSES, INPUT, STEPS = 5, 3, 12, 16, 3


class Features(torch.nn.Linear):
    """A backbone without BatchNorm: the same output whether one process or several run it."""

    def __init__(self):
        super().__init__(INPUT, 24)
        self.out_features = 24


def build(
    context: Context, neighbors=None, metric="npair", memory=0, edge_attention="none"
) -> AlternatingTrainer:
    torch.manual_seed(0)
    model = GCAHNG(
        Features(),
        TRAIN_CLASSES,
        16,
        net=NetConfig(num_layers=2, heads=2, dropout=0.0, edge_attention=edge_attention),
        loss=LossConfig(metric=metric),
        graph=GraphConfig(neighbors=neighbors, memory=memory),
        process_group=context.process_group,
    )
    trainer = AlternatingTrainer(
        model, OptimConfig(warmup_epochs=0, metric_lr=1e-3, net_lr=1e-3), seed=0
    )
    # Past the first epoch: hardness below 1 and J_syn at full weight.
    model.generator.mean_metric_loss, model.generator.mean_generator_loss = 3.0, 0.5
    return trainer


def initial_proxies():
    """The proxies a freshly built Proxy-Anchor model starts from (float64)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build(Context(), metric="proxy_anchor").model.criterion.proxies.detach().clone()
    finally:
        torch.set_default_dtype(default)


def global_batch(step: int):
    """A class-major batch of CLASSES × SAMPLES inputs (rows of one class together)."""
    generator = torch.Generator().manual_seed(100 + step)
    classes = torch.randperm(TRAIN_CLASSES, generator=generator)[:CLASSES]
    labels = classes.repeat_interleave(SAMPLES)
    inputs = torch.randn(CLASSES * SAMPLES, INPUT, generator=generator) + labels.unsqueeze(1)
    return inputs.to(torch.get_default_dtype()), labels


def train(context: Context, neighbors=None, metric="npair", memory=0, edge_attention="none"):
    """STEPS training steps; this process's share of every batch is its contiguous block of
    classes (uneven: CLASSES is odd). Returns the final parameters/buffers, the losses and the
    stored edge counts (of the graph of the batch after each step), the memory nodes of each
    step's graph and the final memory; `neighbors` is ``graph.neighbors``, `metric`
    ``loss.metric``, `memory` ``graph.memory``, `edge_attention` ``net.edge_attention``."""
    trainer = build(context, neighbors, metric, memory, edge_attention)
    first = context.rank * CLASSES // context.world_size
    last = (context.rank + 1) * CLASSES // context.world_size
    rows = slice(first * SAMPLES, last * SAMPLES)
    losses, edges, memory_nodes = [], [], []
    for step in range(STEPS):
        inputs, labels = global_batch(step)
        if trainer.memory is not None:
            with torch.no_grad():
                embeddings = trainer.model(inputs[rows])
            graph_memory = trainer.batch_graph(labels[rows], embeddings).memory
            memory_nodes.append(None if graph_memory is None else graph_memory.index)
        losses.append(trainer.training_step(inputs[rows], labels[rows]))
        with torch.no_grad():
            embeddings = trainer.model(inputs[rows])  # training mode: every process's rows
        edges.append(trainer.batch_graph(labels[rows], embeddings).shard.num_edges)
    state = {
        name: value.detach().clone()
        for name, value in trainer.model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    final_memory = None if trainer.memory is None else trainer.memory.state_dict()
    return {
        "state": state,
        "losses": losses,
        "edges": edges,
        "memory_nodes": memory_nodes,
        "memory": final_memory,
    }


def worker(
    rank: int,
    world_size: int,
    folder: str,
    neighbors=None,
    metric="npair",
    memory=0,
    edge_attention="none",
):
    """Entry point of a spawned process: gloo group through a file, float64, one thread."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(folder, 'rendezvous')}",
        rank=rank,
        world_size=world_size,
    )
    try:
        context = Context(rank=rank, world_size=world_size, process_group=dist.group.WORLD)
        torch.save(
            train(context, neighbors, metric, memory, edge_attention),
            os.path.join(folder, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
