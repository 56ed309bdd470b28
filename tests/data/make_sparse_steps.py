"""Writes sparse_steps.pt: the losses and final state of a few training steps on a sparse batch
graph (graph.neighbors: 2) with batches that draw 4 of 8 classes, for N-pair and Proxy-Anchor,
float64, 2 threads. It was run at the last commit before memory nodes existed (0a11bf2):
with graph.memory at 0, or memory that has not started, today's code must give the same numbers
bit for bit (tests/test_memory.py).

    python tests/data/make_sparse_steps.py tests/data/sparse_steps.pt

CPU kernels vectorised wider than AVX2 sum in another order, so a record is made per
``torch.backends.cpu.get_cpu_capability()``: ``sparse_steps.pt`` on AVX2, and e.g.
``sparse_steps.AVX512.pt`` by this script at the same commit on an AVX-512 CPU.
"""

import sys

import torch

from gca_pyg.graph import GraphConfig
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LossConfig, NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer

CLASSES, PER_BATCH, SAMPLES, STEPS = 8, 4, 3, 4


class Features(torch.nn.Linear):
    def __init__(self):
        super().__init__(20, 24)
        self.out_features = 24


def batches():
    generator = torch.Generator().manual_seed(7)
    prototypes = torch.randn(CLASSES, 20, generator=generator, dtype=torch.float64)
    for _ in range(STEPS):
        classes = torch.randperm(CLASSES, generator=generator)[:PER_BATCH]
        labels = classes.repeat_interleave(SAMPLES)
        yield prototypes[labels] + torch.randn(labels.numel(), 20, generator=generator), labels


def run(metric: str, graph: GraphConfig) -> dict:
    torch.manual_seed(0)
    model = GCAHNG(
        Features(),
        CLASSES,
        16,
        net=NetConfig(num_layers=2, heads=4, dropout=0.1),
        loss=LossConfig(metric=metric, synthetic_proxies="anchor"),  # 0.2.0's default
        graph=graph,
    ).double()
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=10), seed=0)
    model.generator.mean_metric_loss, model.generator.mean_generator_loss = 3.0, 1.0
    losses = [trainer.training_step(images, labels) for images, labels in batches()]
    state = {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    return {"losses": losses, "state": state}


if __name__ == "__main__":
    torch.set_num_threads(2)
    graph = GraphConfig(neighbors=2)
    torch.save({metric: run(metric, graph) for metric in ("npair", "proxy_anchor")}, sys.argv[1])
