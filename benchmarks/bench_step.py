"""One full GCA-HNG training step: graph, correlation net, synthesis, losses, three optimiser updates.

The backbone is replaced by random 2048-d pooled features (the embedding head BN + Linear(2048, 512)
stays), so the step costs what GCA-HNG adds on top of a CNN. N = 81 (27 × 3) and 162 (54 × 3),
D = 512, fp32 and bf16 autocast; median ms/step, peak memory and the share of this machine's
measured matmul peak, each row in a fresh process.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --sizes 81 --profile     # where the time goes

``--backbone resnet50`` (224 px) or ``small_cnn`` (32 px) times the real step with images through
the backbone (random weights), fp32 and bf16 (where native), contiguous and ``channels_last``, and
the share of the step spent in the backbone (the step minus the same step on pooled features).

    python benchmarks/bench_step.py --backbone resnet50 --sizes 81
"""
import json
import sys

import torch

from gca_pyg.runtime import retain_freed_memory

from common import (benchmark_parser, default_device, measure_in_child, measure_step, native_bf16,
                    print_table, report_machine)

FEATURES, TRAIN_CLASSES = 2048, 100


class PooledFeatures(torch.nn.Identity):
    """Stands in for a CNN whose pooled features are the input."""
    out_features = FEATURES


IMAGE_SIZES = {"resnet50": 224, "googlenet": 224, "small_cnn": 32}


def build(config):
    from gca_pyg.backbones import build_backbone
    from gca_pyg.model import GCAHNG
    from gca_pyg.trainer import AlternatingTrainer, OptimConfig

    torch.manual_seed(0)
    device = torch.device(config["device"])
    amp = torch.bfloat16 if config["dtype"] == "bf16" else None
    backbone_name = config.get("backbone")
    channels_last = config.get("memory_format") == "channels_last"
    if backbone_name:
        backbone = build_backbone(backbone_name, pretrained="none", frozen_bn=True)
    else:
        backbone = PooledFeatures()
    model = GCAHNG(backbone, TRAIN_CLASSES, config["dim"], amp_dtype=amp,
                   channels_last=channels_last).to(device)
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
    num_nodes = config["num_nodes"]
    if backbone_name:
        size = IMAGE_SIZES[backbone_name]
        features = torch.randn(num_nodes, 3, size, size, device=device)
    else:
        features = torch.randn(num_nodes, FEATURES, device=device)
    labels = torch.randperm(TRAIN_CLASSES, device=device)[:num_nodes // 3].repeat_interleave(3)
    # Past the first epoch, so that J_syn carries weight and hardness is below 1, as in training.
    trainer.mean_metric_loss, trainer.mean_generator_loss = 3.0, 30.0
    return trainer, features, labels, device


def run_child(config):
    if config["malloc"] == "retain":
        retain_freed_memory()
    trainer, features, labels, device = build(config)

    def step():
        trainer.training_step(features, labels)

    print(json.dumps(measure_step(step, device, config["repeats"])))


def profile(config, rows: int = 15):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    retain_freed_memory()
    trainer, features, labels, device = build(config)
    trainer.training_step(features, labels)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        trainer.training_step(features, labels)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81, 162], repeats=5)
    parser.add_argument("--malloc", nargs="+", default=["system", "retain"],
                        choices=["system", "retain"],
                        help="glibc malloc as it comes, or gca_pyg.runtime.retain_freed_memory() "
                             "as the training command sets it")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators for one step of each size")
    parser.add_argument("--backbone", choices=sorted(IMAGE_SIZES),
                        help="time the step with images through this backbone (random weights)")
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))

    device = default_device()
    if args.profile:
        for num_nodes in args.sizes:
            print(f"== profile: N={num_nodes}, D={args.dim}, fp32")
            profile({"device": str(device), "num_nodes": num_nodes, "dim": args.dim,
                     "dtype": "fp32", "backbone": args.backbone})
        return
    if args.backbone:
        return backbone_table(args, device)

    peak = report_machine(device)
    rows, skipped = [], []
    for dtype in args.dtypes:
        for num_nodes in args.sizes:
            for malloc in args.malloc:
                if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                    skipped.append(f"N={num_nodes} bf16 {malloc}")
                    continue
                result = measure_in_child(__file__, {
                    "device": str(device), "num_nodes": num_nodes, "dim": args.dim,
                    "dtype": dtype, "repeats": args.repeats, "malloc": malloc})
                if "error" in result:
                    rows.append([num_nodes, dtype, malloc, result["error"], "", "", "", ""])
                    continue
                achieved = result["gflop"] / (result["ms"] / 1e3)
                rows.append([num_nodes, dtype, malloc, f"{result['ms']:.0f}",
                             f"{result['peak_mb']:.0f}", f"{result['gflop']:.1f}",
                             f"{achieved:.0f}", f"{100 * achieved / peak[dtype]:.0f}%"])
                print(f"  measured N={num_nodes} {dtype} {malloc}", file=sys.stderr)
    print_table(["N", "dtype", "malloc", "ms/step", "peak MB", "GFLOP/step", "GFLOP/s", "of peak"],
                rows)
    if skipped:
        print(f"skipped (no native bf16 matmul here; --force-bf16 to measure anyway): "
              f"{', '.join(skipped)}")


def backbone_table(args, device):
    """The whole step with a backbone: dtype x memory format, and the backbone's share."""
    report_machine(device)
    rows, skipped, fastest = [], [], None
    for num_nodes in args.sizes:
        for dtype in args.dtypes:
            if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                skipped.append(f"N={num_nodes} bf16")
                continue
            common = {"device": str(device), "num_nodes": num_nodes, "dim": args.dim,
                      "dtype": dtype, "repeats": args.repeats, "malloc": "retain"}
            graph_only = measure_in_child(__file__, common)
            for memory_format in ("contiguous", "channels_last"):
                result = measure_in_child(__file__, {**common, "backbone": args.backbone,
                                                     "memory_format": memory_format})
                if "error" in result or "error" in graph_only:
                    rows.append([num_nodes, dtype, memory_format,
                                 result.get("error", graph_only.get("error")), "", ""])
                    continue
                share = 1 - graph_only["ms"] / result["ms"]
                rows.append([num_nodes, dtype, memory_format, f"{result['ms']:.0f}",
                             f"{result['peak_mb']:.0f}", f"{100 * share:.0f}%"])
                if fastest is None or result["ms"] < fastest[0]:
                    fastest = (result["ms"], dtype, memory_format)
                print(f"  measured N={num_nodes} {dtype} {memory_format}", file=sys.stderr)
    print(f"backbone {args.backbone}, {IMAGE_SIZES[args.backbone]} px, random weights, "
          f"frozen BatchNorm statistics")
    print_table(["N", "dtype", "memory format", "ms/step", "peak MB", "backbone share"], rows)
    if fastest:
        print(f"fastest: {fastest[1]} {fastest[2]} ({fastest[0]:.0f} ms/step)")
    if skipped:
        print(f"skipped (no native bf16 matmul here): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
