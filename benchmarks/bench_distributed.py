"""One global batch graph in one process or split over several: time per step, memory per process.

The full GCA-HNG step (graph, correlation net x2, synthesis x2, losses, three updates) on a global
batch of N = 27x3, 54x3, 108x3 samples at D = 512, with the backbone replaced by random 2048-d
pooled features as in bench_step.py. One process with all the machine's threads against W
processes (gloo, one thread each) that share the same global batch: median ms/step, the peak memory
of each process and the edge rows it stores. ``--neighbors 32`` uses the sparse batch graph of
``graph.neighbors: 32`` (split by class-pair blocks too), for batches the complete graph cannot
hold.

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --sizes 81 --processes 2 --repeats 3
    python benchmarks/bench_distributed.py --sizes 1024 --per-class 4 --neighbors 32 --repeats 2
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from common import benchmark_parser, measure_step, print_table

FEATURES = 2048


class PooledFeatures(torch.nn.Identity):
    """Stands in for a CNN whose pooled features are the input."""

    out_features = FEATURES


def run_child(config):
    import torch.distributed as dist

    from gca_pyg.graph import GraphConfig
    from gca_pyg.model import GCAHNG
    from gca_pyg.runtime import retain_freed_memory
    from gca_pyg.schema import OptimConfig
    from gca_pyg.trainer import AlternatingTrainer

    retain_freed_memory()
    torch.set_num_threads(config["threads"])
    rank, world = config["rank"], config["world"]
    process_group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{config['rendezvous']}", rank=rank, world_size=world
        )
        process_group = dist.group.WORLD
    torch.manual_seed(0)
    samples = config["per_class"]
    num_nodes = config["num_nodes"]
    classes = num_nodes // samples
    train_classes = max(200, classes)
    model = GCAHNG(
        PooledFeatures(),
        train_classes,
        config["dim"],
        graph=GraphConfig(neighbors=config["neighbors"]),
        process_group=process_group,
    )
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
    model.generator.mean_metric_loss, model.generator.mean_generator_loss = 3.0, 30.0
    features = torch.randn(classes * samples, FEATURES)
    labels = torch.randperm(train_classes)[:classes].repeat_interleave(samples)
    # This process's whole classes, as the sampler shares them.
    rows = slice(rank * classes // world * samples, (rank + 1) * classes // world * samples)

    result = measure_step(
        lambda: trainer.training_step(features[rows], labels[rows]),
        torch.device("cpu"),
        config["repeats"],
    )
    with torch.no_grad():
        embeddings = trainer.model(features[rows])
    result["edges"] = trainer.batch_graph(labels[rows], embeddings).shard.num_edges
    if process_group is not None:
        dist.destroy_process_group()
    print(json.dumps(result))


def measure(script: str, num_nodes: int, world: int, threads: int, args) -> list:
    """Starts `world` processes of one run; returns each one's result."""
    folder = tempfile.mkdtemp()
    repository = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")])),
    }
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                "--child",
                json.dumps(
                    {
                        "rank": rank,
                        "world": world,
                        "threads": threads,
                        "num_nodes": num_nodes,
                        "dim": args.dim,
                        "repeats": args.repeats,
                        "per_class": args.per_class,
                        "neighbors": args.neighbors,
                        "rendezvous": os.path.join(folder, "rendezvous"),
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    results = []
    for process in processes:
        out, err = process.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            results.append({"error": (err.strip().splitlines() or ["no output"])[-1]})
        else:
            results.append(json.loads(lines[-1]))
    return results


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81, 162, 324], repeats=3)
    parser.add_argument("--processes", type=int, default=2, help="processes of the split runs")
    parser.add_argument("--per-class", type=int, default=3, help="samples per class, K")
    parser.add_argument(
        "--neighbors", type=int, default=None, help="graph.neighbors (default: complete graph)"
    )
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))

    threads = torch.get_num_threads()
    graph = "complete graph" if args.neighbors is None else f"graph.neighbors={args.neighbors}"
    print(
        f"cpu, fp32, D={args.dim}, K={args.per_class}, {graph}; one process with {threads} "
        f"threads vs {args.processes} processes with 1 thread each (gloo)"
    )
    rows = []
    for num_nodes in args.sizes:
        for world, per_process in ((1, threads), (args.processes, 1)):
            results = measure(__file__, num_nodes, world, per_process, args)
            failed = [r["error"] for r in results if "error" in r]
            if failed:
                rows.append([num_nodes, world, failed[0], "", "", ""])
                continue
            rows.append(
                [
                    num_nodes,
                    world,
                    f"{max(r['ms'] for r in results):.0f}",
                    f"{max(r['peak_mb'] for r in results):.0f}",
                    f"{max(r['edges'] for r in results)}",
                    f"{sum(r['edges'] for r in results)}",
                ]
            )
            print(f"  measured N={num_nodes} with {world} process(es)", file=sys.stderr)
    print_table(
        ["N", "processes", "ms/step", "peak MB/process", "edges/process", "edges total"], rows
    )


if __name__ == "__main__":
    main()
