"""Forward + backward time and peak memory of CorrelationNet on the dense batch graph.

Compares the generic path (all N² directed edges) with the fast path (undirected storage, N(N+1)/2
edges) for N in {81, 162, 324} (C × 3), D = 512, fp32 and bf16 autocast, and shows each row's
matmul throughput as a share of this machine's own measured matmul peak. Every row runs in a fresh
process so that its peak memory is its own.

    python benchmarks/bench_layers.py
    python benchmarks/bench_layers.py --sizes 81 --dtypes bf16 --force-bf16
    python benchmarks/bench_layers.py --sizes 81 --paths fast --profile   # where the time goes
    python benchmarks/bench_layers.py --threads 1   # steadier on a machine shared with other jobs

``--pyg`` times the layer where PyG users run it instead: one sparse batch (10,000 nodes, 100,000
random edges, 64 channels, edge features of 64), forward + backward, EdgeNodeConv with each
``edge_attention`` option (and its node half alone, and with ``ffn_ratio=1``) against PyG's
TransformerConv and GATv2Conv at the same width (4 heads of 16, ``edge_dim=64``); the last column is
each row's time per edge over TransformerConv's::

    python benchmarks/bench_layers.py --pyg
    python benchmarks/bench_layers.py --pyg --nodes 2000 --edges 20000 --dtypes fp32
    python benchmarks/bench_layers.py --pyg --profile --dtypes fp32 --threads 1   # where it goes
"""

import json
import sys

import torch
from common import (
    MemoryGuard,
    autocast,
    benchmark_parser,
    default_device,
    load_average,
    measure_in_child,
    measure_step,
    native_bf16,
    print_table,
    report_machine,
)

from gca_pyg.nn import EDGE_ATTENTION
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


PYG_LAYERS = {
    "TransformerConv(edge_dim)": {"layer": "transformer"},
    "GATv2Conv(edge_dim)": {"layer": "gatv2"},
    **{
        f"EdgeNodeConv({option})": {"layer": "edge_node", "edge_attention": option}
        for option in EDGE_ATTENTION
    },
    "EdgeNodeConv(none), node half": {"layer": "edge_node", "nodes_only": True},
    "EdgeNodeConv(none), ffn_ratio=1": {"layer": "edge_node", "ffn_ratio": 1},
}


def build_pyg_step(config):
    """One forward + backward of a PyG-style layer on a random sparse graph."""
    from torch_geometric.nn import GATv2Conv, TransformerConv

    from gca_pyg.nn import EdgeNodeConv

    torch.manual_seed(0)
    device = torch.device(config["device"])
    nodes, edges, channels, heads = config["nodes"], config["edges"], config["dim"], 4
    x = torch.randn(nodes, channels, device=device, requires_grad=True)
    edge_index = torch.randint(nodes, (2, edges), device=device)
    edge_attr = torch.randn(edges, channels, device=device, requires_grad=True)
    layer = config["layer"]
    if layer == "transformer":
        conv = TransformerConv(channels, channels // heads, heads=heads, edge_dim=channels)
    elif layer == "gatv2":
        conv = GATv2Conv(channels, channels // heads, heads=heads, edge_dim=channels)
    else:
        conv = EdgeNodeConv(
            channels,
            channels,
            edge_dim=channels,
            heads=heads,
            ffn_ratio=config.get("ffn_ratio", 4),
            edge_attention=config.get("edge_attention", "none"),
        )
    conv = conv.to(device).train()

    def forward():
        if layer != "edge_node":
            return conv(x, edge_index, edge_attr).float().square().sum()
        if config.get("nodes_only"):
            return conv.update_nodes(x, edge_index, edge_attr).float().square().sum()
        h, e = conv(x, edge_index, edge_attr)
        return h.float().square().sum() + e.float().square().sum()

    def step():
        with autocast(device, config["dtype"]):
            loss = forward()
        loss.backward()

    parameters = sum(parameter.numel() for parameter in conv.parameters())
    return step, device, parameters


def pyg_table(args, device):
    rows, skipped = [], []
    for dtype in args.dtypes:
        if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
            skipped.append(dtype)
            continue
        reference_ms = None
        for name, settings in PYG_LAYERS.items():
            config = {
                "pyg": True,
                "device": str(device),
                "nodes": args.nodes,
                "edges": args.edges,
                "dim": args.dim,
                "dtype": dtype,
                "repeats": args.repeats,
                "threads": args.threads,
                **settings,
            }
            result = measure_in_child(__file__, config)
            if "error" in result:
                rows.append([name, dtype, "", result["error"], "", "", "", ""])
                continue
            if reference_ms is None:
                reference_ms = result["ms"]
            rows.append(
                [
                    name,
                    dtype,
                    result["parameters"],
                    f"{result['ms']:.0f}",
                    f"{1e3 * result['ms'] / args.edges:.2f}",
                    f"{result['peak_mb']:.0f}",
                    f"{result['gflop']:.3g}",
                    f"{result['ms'] / reference_ms:.2f}x",
                ]
            )
            print(f"  measured {name} {dtype}", file=sys.stderr)
    print(
        f"{args.nodes} nodes, {args.edges} edges, {args.dim} channels (edge features too), "
        f"forward + backward, load average {load_average()}"
    )
    header = ["layer", "dtype", "parameters", "fwd+bwd ms", "us / edge", "peak MB", "GFLOP"]
    print_table([*header, "vs TransformerConv"], rows)
    if skipped:
        print("skipped bf16 (no native bf16 matmul here; --force-bf16 to measure anyway)")


def run_child(config):
    retain_freed_memory()  # as the training command does
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    if config.get("pyg"):
        step, device, parameters = build_pyg_step(config)
        print(
            json.dumps({**measure_step(step, device, config["repeats"]), "parameters": parameters})
        )
        return
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
    step, device = build_pyg_step(config)[:2] if config.get("pyg") else build_step(config)
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
    parser.add_argument(
        "--pyg",
        action="store_true",
        help="time EdgeNodeConv against TransformerConv and GATv2Conv on a sparse PyG batch",
    )
    parser.add_argument("--nodes", type=int, default=10_000, help="with --pyg")
    parser.add_argument("--edges", type=int, default=100_000, help="with --pyg")
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))

    device = default_device()
    if args.pyg:
        if args.dim == 512:  # the batch-graph default; PyG users' layers are narrower
            args.dim = 64
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.profile:  # the paper's layer, whole, in each dtype
            for dtype in args.dtypes:
                print(f"== profile: EdgeNodeConv(none), {args.nodes} nodes, {args.edges} edges")
                profile(
                    {
                        "pyg": True,
                        "layer": "edge_node",
                        "device": str(device),
                        "nodes": args.nodes,
                        "edges": args.edges,
                        "dim": args.dim,
                        "dtype": dtype,
                        "threads": args.threads,
                    }
                )
            return
        report_machine(device)
        return pyg_table(args, device)
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
