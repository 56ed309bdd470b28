"""What memory nodes cost: one training step with ``graph.memory: M`` against M = 0.

The step of ``bench_step.py`` (random 2048-d pooled features through the embedding head, N = 81,
D = 512, fp32) on the sparse batch graph of ``graph.neighbors: k``, with a memory filled with M
random embeddings of 1,000 training classes (so nearly every entry's class is absent from the
batch, and the k nearest of a node are mostly memory entries: the dearest case). Each row runs in
a fresh process: median ms/step, the rise of the peak memory during the step (resident set on the
CPU, allocated memory on CUDA), the process's whole peak resident set, the memory nodes and pairs
of the step's graph, and the step time as a multiple of the M = 0 row measured in the same run.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --memory 0 4096 --neighbors 16 --sizes 162
"""

import json
import sys

import torch
from bench_step import build
from common import (
    benchmark_parser,
    default_device,
    measure_in_child,
    measure_step,
    peak_rss_mb,
    print_table,
)

from gca_pyg.runtime import retain_freed_memory

MEMORY_CLASSES = 1000


def run_child(config):
    retain_freed_memory()
    trainer, features, labels, device = build({**config, "train_classes": MEMORY_CLASSES})
    size = config["memory"]
    if size:
        generator = torch.Generator().manual_seed(1)
        trainer.memory.enqueue(
            torch.randn(size, config["dim"], generator=generator).to(device),
            torch.randint(0, MEMORY_CLASSES, (size,), generator=generator).to(device),
        )

    def step():  # a full memory stays full: each step's batch replaces its oldest entries
        trainer.training_step(features, labels)

    result = measure_step(step, device, config["repeats"])
    with torch.no_grad():
        graph = trainer.batch_graph(labels, trainer.model(features))
    nodes = 0 if graph.memory is None else graph.memory.num_nodes
    print(
        json.dumps(
            {**result, "rss_mb": peak_rss_mb(), "edges": graph.shard.num_edges, "nodes": nodes}
        )
    )


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81], repeats=5)
    parser.add_argument("--memory", type=int, nargs="+", default=[0, 1024, 4096, 16384])
    parser.add_argument("--neighbors", type=int, default=32, help="graph.neighbors k")
    parser.add_argument("--per-class", type=int, default=3, help="samples per class K")
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    if 0 not in args.memory:
        parser.error("--memory must include 0: the other rows are measured against it")
    device = default_device()
    print(
        f"device {device}, {torch.get_num_threads()} threads; k = {args.neighbors}, "
        f"D = {args.dim}, fp32"
    )
    rows = []
    for num_nodes in args.sizes:
        baseline = None
        for size in sorted(args.memory):
            result = measure_in_child(
                __file__,
                {
                    "device": str(device),
                    "num_nodes": num_nodes,
                    "per_class": args.per_class,
                    "dim": args.dim,
                    "dtype": "fp32",
                    "neighbors": args.neighbors,
                    "memory": size,
                    "repeats": args.repeats,
                },
            )
            if "error" in result:
                rows.append([num_nodes, size, result["error"]] + [""] * 6)
                continue
            baseline = baseline or result["ms"]
            rows.append(
                [
                    num_nodes,
                    size,
                    result["nodes"],
                    result["edges"],
                    f"{result['ms']:.0f}",
                    f"{result['ms'] / baseline:.2f}x",
                    f"{result['peak_mb']:.0f}",
                    f"{result['rss_mb']:.0f}",
                ]
            )
            print(f"  measured N={num_nodes} M={size}", file=sys.stderr)
    print_table(
        [
            "N",
            "M",
            "memory nodes",
            "pairs",
            "ms/step",
            "vs M=0",
            "step peak MB",
            "process peak RSS MB",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
