"""One full GCA-HNG training step: graph, correlation net, synthesis, losses, three updates.

The backbone is replaced by random 2048-d pooled features (the embedding head BN + Linear(2048, 512)
stays), so the step costs what GCA-HNG adds on top of a CNN. N = 81 (27 × 3) and 162 (54 × 3),
D = 512, fp32 and bf16 autocast; median ms/step, peak memory and the share of this machine's
measured matmul peak, each row in a fresh process. "of peak" is the step's matmul FLOPs over its
whole time; "matmuls of peak" the same FLOPs over the time spent inside the matmuls alone (each
timed where it is dispatched), i.e. how well the products themselves run. ``--neighbors 32``
measures the sparse batch graph of ``graph.neighbors: 32`` (``dense`` is the complete graph); rows
whose memory, foreseen from the rows measured before them (in proportion to their edge count),
would not fit are skipped.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --sizes 81 --profile   # where the time goes: phases, operators
    python benchmarks/bench_step.py --per-class 4 --sizes 512 1024 --neighbors dense 32

``--backbone resnet50``, ``googlenet``, ``dino_vits16`` (224 px; the last needs timm) or
``small_cnn`` (32 px) times the real step with images through the backbone (random weights), fp32
and bf16 (where native), contiguous and ``channels_last``, and the share of the step spent in the
backbone (the step minus the same step on pooled features of the backbone's width).

    python benchmarks/bench_step.py --backbone resnet50 --sizes 81
    python benchmarks/bench_step.py --backbone dino_vits16 --sizes 81 --dim 384
"""

import argparse
import json
import sys
import time

import torch
from common import (
    MATMUL_OPS,
    MemoryGuard,
    OperatorTimer,
    add_malloc_argument,
    benchmark_parser,
    default_device,
    matmul_ms,
    measure_in_child,
    measure_step,
    native_bf16,
    print_table,
    report_machine,
)

from gca_pyg.runtime import retain_freed_memory

FEATURES, TRAIN_CLASSES = 2048, 100


class PooledFeatures(torch.nn.Identity):
    """Stands in for a backbone whose pooled features (`out_features` wide) are the input."""

    def __init__(self, out_features: int = FEATURES):
        super().__init__()
        self.out_features = out_features


IMAGE_SIZES = {"resnet50": 224, "googlenet": 224, "dino_vits16": 224, "small_cnn": 32}
#: The width of each backbone's pooled features.
BACKBONE_FEATURES = {"resnet50": 2048, "googlenet": 1024, "dino_vits16": 384, "small_cnn": 128}


def build(config):
    from gca_pyg.backbones import build_backbone
    from gca_pyg.graph import GraphConfig
    from gca_pyg.model import GCAHNG
    from gca_pyg.schema import OptimConfig
    from gca_pyg.trainer import AlternatingTrainer

    torch.manual_seed(0)
    device = torch.device(config["device"])
    amp = torch.bfloat16 if config["dtype"] == "bf16" else None
    backbone_name = config.get("backbone")
    channels_last = config.get("memory_format") == "channels_last"
    features_width = config.get("features", FEATURES)
    if backbone_name:
        backbone = build_backbone(
            backbone_name,
            pretrained="none",
            frozen_bn=True,
            image_size=IMAGE_SIZES[backbone_name],
        )
    else:
        backbone = PooledFeatures(features_width)
    num_nodes, per_class = config["num_nodes"], config.get("per_class", 3)
    num_classes = num_nodes // per_class
    train_classes = max(config.get("train_classes", TRAIN_CLASSES), num_classes)
    model = GCAHNG(
        backbone,
        train_classes,
        config["dim"],
        amp_dtype=amp,
        graph=GraphConfig(neighbors=config.get("neighbors"), memory=config.get("memory", 0)),
        channels_last=channels_last,
    ).to(device)
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
    if backbone_name:
        size = IMAGE_SIZES[backbone_name]
        features = torch.randn(num_nodes, 3, size, size, device=device)
    else:
        features = torch.randn(num_nodes, features_width, device=device)
    labels = torch.randperm(train_classes, device=device)[:num_classes].repeat_interleave(per_class)
    # Past the first epoch, so that J_syn carries weight and hardness is below 1, as in training.
    model.generator.mean_metric_loss, model.generator.mean_generator_loss = 3.0, 30.0
    return trainer, features, labels, device


def run_child(config):
    if config["malloc"] == "retain":
        retain_freed_memory()
    trainer, features, labels, device = build(config)

    def step():
        trainer.training_step(features, labels)

    result = measure_step(step, device, config["repeats"])
    result["matmul_ms"] = matmul_ms(step, device)
    with torch.no_grad():
        graph = trainer.batch_graph(labels, trainer.model(features))
    print(json.dumps({**result, "edges": graph.shard.num_edges}))


def _timed_phases(trainer, totals: dict) -> list:
    """Wraps the step's phases in wall-clock timers that add into `totals` (outermost phase only);
    returns what to undo."""
    import gca_pyg.generator as generator_module
    import gca_pyg.losses as losses_module

    targets = (
        [
            ("net forward", generator_module.HardNegativeGenerator, "correlate"),
            ("synthesis", generator_module.HardNegativeGenerator, "synthesize"),
            ("backward", torch.Tensor, "backward"),
            ("clipping", torch.nn.utils, "clip_grad_value_"),
        ]
        + [
            ("optimizer", optimizer, "step")  # instances: torch wraps the class's step
            for optimizer in (
                trainer.metric_optimizer,
                trainer.net_optimizer,
                trainer.classifier_optimizer,
            )
        ]
        + [
            ("losses", module, name)
            for module, names in (
                (losses_module, ("npair_loss", "synthetic_npair_loss")),
                (generator_module, ("synthetic_class_loss", "similarity_loss", "diversity_loss")),
            )
            for name in names
        ]
    )
    active = []

    def timed(label, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            active.append(label)
            try:
                return function(*args, **kwargs)
            finally:
                active.pop()
                if not active:
                    totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    undo = []
    for label, owner, name in targets:
        original = getattr(owner, name)
        undo.append((owner, name, original))
        setattr(owner, name, timed(label, original))
    return undo


def profile(config, rows: int = 25):
    """Where one step's time goes: its phases (wall clock) and its slowest operators.

    On the CPU the operators are timed where they are dispatched (``common.OperatorTimer``):
    torch.profiler's own per-operator work inflated elementwise operators several times over at
    2 threads here. On CUDA, torch.profiler's table.
    """
    retain_freed_memory()
    trainer, features, labels, device = build(config)
    for _ in range(2):
        trainer.training_step(features, labels)
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        torch.cuda.synchronize(device)
        start = time.perf_counter()
        trainer.training_step(features, labels)
        torch.cuda.synchronize(device)
        step_ms = (time.perf_counter() - start) * 1e3
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.training_step(features, labels)
        averages = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        print(
            f"one step: {step_ms:.1f} ms of wall time, {len(kernels)} GPU kernels and copies "
            f"busy for {busy_ms:.1f} ms of it ({100 * busy_ms / step_ms:.0f}%); the rest is "
            "the host launching them and waiting"
        )
        print(averages.table(sort_by="self_device_time_total", row_limit=rows))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
        return

    totals, repeats = {}, 3
    undo = _timed_phases(trainer, totals)
    try:
        start = time.perf_counter()
        for _ in range(repeats):
            trainer.training_step(features, labels)
        step_ms = (time.perf_counter() - start) / repeats * 1e3
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)
    phases = sorted(totals.items(), key=lambda item: -item[1])
    table = [[label, f"{seconds / repeats * 1e3:.1f}"] for label, seconds in phases]
    table.append(["rest", f"{step_ms - sum(totals.values()) / repeats * 1e3:.1f}"])
    print(f"one step: {step_ms:.0f} ms (mean of {repeats})")
    print_table(["phase", "ms"], table)

    with OperatorTimer() as timer:
        trainer.training_step(features, labels)
    matmuls = sum(t for (name, _), (_, t) in timer.calls.items() if name in MATMUL_OPS)
    print(
        f"\noperators: {sum(n for n, _ in timer.calls.values())} calls, "
        f"{timer.seconds * 1e3:.0f} ms inside them, {matmuls * 1e3:.0f} ms of it in matmuls "
        "(the timer's own Python adds to the step, not to these)"
    )
    slowest = sorted(timer.calls.items(), key=lambda item: -item[1][1])[:rows]
    print_table(
        ["operator", "first input", "calls", "ms"],
        [
            [name, shape, calls, f"{seconds * 1e3:.1f}"]
            for (name, shape), (calls, seconds) in slowest
        ],
    )


def neighbors_choice(text: str):
    """``dense`` (None, the complete graph) or a positive number of neighbours."""
    if text == "dense":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes 'dense' or a positive int, got '{text}'")
    return int(text)


def foreseen_edges(num_nodes: int, per_class: int, neighbors) -> int:
    """The undirected pairs of a row's graph: exact for the complete graph, an upper bound for a
    sparse one (k nearest and the classmates of every node)."""
    if neighbors is None or neighbors >= num_nodes - 1:
        return num_nodes * (num_nodes + 1) // 2
    return num_nodes * neighbors + num_nodes * (per_class + 1) // 2


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81, 162], repeats=5)
    add_malloc_argument(parser)
    parser.add_argument(
        "--per-class",
        type=int,
        default=3,
        help="samples per class K; every size must be a multiple of it",
    )
    parser.add_argument(
        "--neighbors",
        nargs="+",
        type=neighbors_choice,
        default=[None],
        metavar="dense|K",
        help="the batch graph: dense (complete) or graph.neighbors = K",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top operators for one step of each size",
    )
    parser.add_argument(
        "--backbone",
        choices=sorted(IMAGE_SIZES),
        help="time the step with images through this backbone (random weights)",
    )
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    bad = [n for n in args.sizes if n % args.per_class or n // args.per_class < 2]
    if args.per_class < 2 or bad:
        parser.error(
            f"every size must be a multiple of --per-class {args.per_class} (>= 2), with "
            f"at least 2 classes; got {bad or args.sizes}"
        )

    device = default_device()
    if args.profile:
        for num_nodes in args.sizes:
            for neighbors in args.neighbors:
                for dtype in args.dtypes:
                    if dtype == "bf16" and not native_bf16(device):
                        print(f"skipped bf16 profile: no native bf16 on {device}")
                        continue
                    print(
                        f"== profile: N={num_nodes}, K={args.per_class}, D={args.dim}, {dtype}, "
                        f"graph {'dense' if neighbors is None else f'k={neighbors}'}"
                    )
                    profile(
                        {
                            "device": str(device),
                            "num_nodes": num_nodes,
                            "dim": args.dim,
                            "dtype": dtype,
                            "per_class": args.per_class,
                            "neighbors": neighbors,
                            "backbone": args.backbone,
                        }
                    )
        return
    if args.backbone:
        return backbone_table(args, device)

    peak = report_machine(device)
    rows, skipped, too_big = [], [], []
    runs = [
        (dtype, num_nodes, neighbors, malloc)
        for dtype in args.dtypes
        for num_nodes in args.sizes
        for neighbors in args.neighbors
        for malloc in args.malloc
    ]
    # Smaller graphs first, so that every row's memory is foreseen from measured ones.
    runs.sort(
        key=lambda run: (args.dtypes.index(run[0]), foreseen_edges(run[1], args.per_class, run[2]))
    )
    guard = MemoryGuard()
    for dtype, num_nodes, neighbors, malloc in runs:
        graph = "dense" if neighbors is None else f"k={neighbors}"
        name = f"N={num_nodes} {graph} {dtype} {malloc}"
        if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
            skipped.append(name)
            continue
        edges = foreseen_edges(num_nodes, args.per_class, neighbors)
        kind = f"{dtype} {'dense' if neighbors is None else 'sparse'}"
        reason = guard.too_big(edges, kind)
        if reason is not None:
            too_big.append(f"{name} ({reason})")
            continue
        result = measure_in_child(
            __file__,
            {
                "device": str(device),
                "num_nodes": num_nodes,
                "dim": args.dim,
                "dtype": dtype,
                "repeats": args.repeats,
                "malloc": malloc,
                "per_class": args.per_class,
                "neighbors": neighbors,
            },
        )
        classes = f"{num_nodes // args.per_class}x{args.per_class}"
        if "error" in result:
            rows.append([num_nodes, classes, graph, "", dtype, malloc, result["error"]] + [""] * 6)
            continue
        guard.record(result["edges"], result["peak_mb"], kind)
        achieved = result["gflop"] / (result["ms"] / 1e3)
        rows.append(
            [
                num_nodes,
                classes,
                graph,
                result["edges"],
                dtype,
                malloc,
                f"{result['ms']:.0f}",
                f"{result['peak_mb']:.0f}",
                f"{result['gflop']:.1f}",
                f"{achieved:.0f}",
                f"{100 * achieved / peak[dtype]:.0f}%",
                f"{result['matmul_ms']:.0f}",
                f"{100 * result['gflop'] / (result['matmul_ms'] / 1e3) / peak[dtype]:.0f}%",
            ]
        )
        print(f"  measured {name}", file=sys.stderr)
    print_table(
        [
            "N",
            "C x K",
            "graph",
            "edges",
            "dtype",
            "malloc",
            "ms/step",
            "peak MB",
            "GFLOP/step",
            "GFLOP/s",
            "of peak",
            "in matmuls ms",
            "matmuls of peak",
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


def backbone_table(args, device):
    """The whole step with a backbone: dtype x memory format, and the backbone's share."""
    report_machine(device)
    rows, skipped, fastest = [], [], None
    for num_nodes in args.sizes:
        for dtype in args.dtypes:
            if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                skipped.append(f"N={num_nodes} bf16")
                continue
            common = {
                "device": str(device),
                "num_nodes": num_nodes,
                "dim": args.dim,
                "dtype": dtype,
                "repeats": args.repeats,
                "malloc": "retain",
            }
            graph_only = measure_in_child(
                __file__, {**common, "features": BACKBONE_FEATURES[args.backbone]}
            )
            for memory_format in ("contiguous", "channels_last"):
                result = measure_in_child(
                    __file__, {**common, "backbone": args.backbone, "memory_format": memory_format}
                )
                if "error" in result or "error" in graph_only:
                    rows.append(
                        [
                            num_nodes,
                            dtype,
                            memory_format,
                            result.get("error", graph_only.get("error")),
                            "",
                            "",
                        ]
                    )
                    continue
                share = 1 - graph_only["ms"] / result["ms"]
                rows.append(
                    [
                        num_nodes,
                        dtype,
                        memory_format,
                        f"{result['ms']:.0f}",
                        f"{result['peak_mb']:.0f}",
                        f"{100 * share:.0f}%",
                    ]
                )
                if fastest is None or result["ms"] < fastest[0]:
                    fastest = (result["ms"], dtype, memory_format)
                print(f"  measured N={num_nodes} {dtype} {memory_format}", file=sys.stderr)
    print(
        f"backbone {args.backbone}, {IMAGE_SIZES[args.backbone]} px, random weights, "
        f"frozen BatchNorm statistics"
    )
    print_table(["N", "dtype", "memory format", "ms/step", "peak MB", "backbone share"], rows)
    if fastest:
        print(f"fastest: {fastest[1]} {fastest[2]} ({fastest[0]:.0f} ms/step)")
    if skipped:
        print(f"skipped (no native bf16 matmul here): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
