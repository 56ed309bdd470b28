"""Forward + backward time and peak memory of CorrelationNet on the dense batch graph.

Compares the generic path (all N² directed edges) with the fast path (undirected storage, N(N+1)/2
edges) for N in {81, 162, 324} (C × 3), D = 512, fp32 and bf16 autocast, and shows each row's
matmul throughput as a share of this machine's own measured matmul peak. Every row runs in a fresh
process so that its peak memory is its own.

    python benchmarks/bench_layers.py
    python benchmarks/bench_layers.py --sizes 81 --dtypes bf16 --force-bf16
    python benchmarks/bench_layers.py --sizes 81 --paths fast --profile   # where the time goes
    python benchmarks/bench_layers.py --threads 1   # steadier on a machine shared with other jobs
"""

import json
import sys

import torch
from common import (
    MemoryGuard,
    autocast,
    benchmark_parser,
    default_device,
    measure_in_child,
    measure_step,
    native_bf16,
    print_table,
    report_machine,
)

from gca_pyg.runtime import retain_freed_memory


def build_step(config):
    """One CorrelationNet forward + backward on the batch graph of random embeddings."""
    from gca_pyg.graph import build_batch_graph
    from gca_pyg.nn import CorrelationNet

    torch.manual_seed(0)
    device = torch.device(config["device"])
    num_nodes, dim = config["num_nodes"], config["dim"]
    undirected = config["path"] == "fast"
    net = CorrelationNet(dim, num_classes=num_nodes // 3, num_layers=2, heads=4).to(device)
    z = torch.randn(num_nodes, dim, device=device, requires_grad=True)
    y = torch.arange(num_nodes // 3, device=device).repeat_interleave(3)

    def step():
        with autocast(device, config["dtype"]):
            graph = build_batch_graph(z, y, undirected=undirected)
            logits, fusion = net(
                graph.x, graph.edge_index, graph.edge_attr, graph.neg_mask, undirected=undirected
            )
        (logits.float().square().mean() + fusion.float().mean()).backward()

    return step, device


def run_child(config):
    retain_freed_memory()  # as the training command does
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    step, device = build_step(config)
    num_nodes = config["num_nodes"]
    edges = num_nodes * (num_nodes + 1) // 2 if config["path"] == "fast" else num_nodes**2
    print(json.dumps({**measure_step(step, device, config["repeats"]), "edges": edges}))


def profile(config, rows: int = 15):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    retain_freed_memory()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    step, device = build_step(config)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        step()
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total",
            row_limit=rows,
            max_name_column_width=40,
            max_shapes_column_width=60,
        )
    )


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81, 162, 324], repeats=2)
    parser.add_argument(
        "--paths", nargs="+", default=["generic", "fast"], choices=["generic", "fast"]
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top operators (by shape) of one forward + "
        "backward of each row instead of timing it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of each row (default: torch's own choice)",
    )
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))

    device = default_device()
    if args.profile:
        for dtype in args.dtypes:
            if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                print("skipped bf16 (no native bf16 matmul here; --force-bf16 to profile anyway)")
                continue
            for num_nodes in args.sizes:
                for path in args.paths:
                    print(f"== profile: {path} N={num_nodes}, D={args.dim}, {dtype}")
                    profile(
                        {
                            "device": str(device),
                            "num_nodes": num_nodes,
                            "dim": args.dim,
                            "dtype": dtype,
                            "path": path,
                            "threads": args.threads,
                        }
                    )
        return

    if args.threads:  # the peak is measured with the rows' thread count
        torch.set_num_threads(args.threads)
    peak = report_machine(device)
    rows, skipped, too_big = [], [], []
    for dtype in args.dtypes:
        guard = MemoryGuard()  # activations grow with the edges, N^2
        for num_nodes in args.sizes:
            generic_ms = None
            for path in args.paths:
                if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                    skipped.append(f"{path} N={num_nodes} bf16")
                    continue
                reason = guard.too_big(num_nodes**2, path)
                if reason is not None:
                    too_big.append(f"{path} N={num_nodes} {dtype} ({reason})")
                    continue
                result = measure_in_child(
                    __file__,
                    {
                        "device": str(device),
                        "num_nodes": num_nodes,
                        "dim": args.dim,
                        "dtype": dtype,
                        "path": path,
                        "repeats": args.repeats,
                        "threads": args.threads,
                    },
                )
                if "error" in result:
                    rows.append([path, num_nodes, "-", dtype, result["error"], "", "", "", "", ""])
                    continue
                guard.record(num_nodes**2, result["peak_mb"], path)
                achieved = result["gflop"] / (result["ms"] / 1e3)
                speedup = ""
                if path == "generic":
                    generic_ms = result["ms"]
                elif generic_ms is not None:
                    speedup = f"{generic_ms / result['ms']:.2f}x"
                rows.append(
                    [
                        path,
                        num_nodes,
                        result["edges"],
                        dtype,
                        f"{result['ms']:.0f}",
                        f"{result['peak_mb']:.0f}",
                        f"{result['gflop']:.1f}",
                        f"{achieved:.0f}",
                        f"{100 * achieved / peak[dtype]:.0f}%",
                        speedup,
                    ]
                )
                print(f"  measured {path} N={num_nodes} {dtype}", file=sys.stderr)
    print_table(
        [
            "path",
            "N",
            "edges",
            "dtype",
            "fwd+bwd ms",
            "peak MB",
            "GFLOP",
            "GFLOP/s",
            "of peak",
            "vs generic",
        ],
        rows,
    )
    if skipped:
        print(
            f"skipped (no native bf16 matmul here; --force-bf16 to measure anyway): "
            f"{', '.join(skipped)}"
        )
    if too_big:
        print(f"skipped (would not fit in this machine's memory): {', '.join(too_big)}")


if __name__ == "__main__":
    main()
