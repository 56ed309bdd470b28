"""Our training step against the authors' own step (PWenJay/GCA-HNG), on this machine, in one run.

Both sides get the same random 2048-d pooled features in place of the CNN (each keeps its embedding
head, BN + Linear(2048, 512)) and the same labels, N = 81 (27 classes × 3) by default, D = 512, the
hyper-parameters of the authors' ``scripts/cfgs/RES_CUB200.yml``. The reference is their
``GCA_HNG.forward`` with its three AdamW optimisers, as their ``train.py`` calls it: metric update,
GNN update on J_gce, classifier update, GNN update on J_gen. Ours is exactly what
``bench_step.py`` builds. Rows: reference fp32, ours fp32, ours bf16 autocast (where the device has
native bf16), each in a fresh process; median ms/step, peak memory, matmul GFLOP/step (the two
implementations need not do the same work) and "reference fp32 ms / this ms" at the same N and
malloc setting. Before any timing, one reference step is checked to run the whole alternating
update (finite losses; the embedding head, the classifier and both GNN updates move parameters).

The authors' code is not part of this repository: pass a checkout of it.

    git clone https://github.com/PWenJay/GCA-HNG /tmp/GCA-HNG
    python benchmarks/bench_reference.py --reference /tmp/GCA-HNG
    python benchmarks/bench_reference.py --reference /tmp/GCA-HNG --sizes 81 162 --malloc retain

Their code is CUDA-only; on a machine without CUDA it runs unmodified under three shims, none of
which edits their files:

- ``torch_scatter`` (if not installed): ``scatter_add``, ``scatter_max`` and ``scatter_mean`` on
  ``torch_geometric.utils.scatter``, with torch_scatter's call signature and return values
  (``scatter_max`` also returns the arg-max, which their code does not use);
- the hard-coded ``device="cuda"`` (and ``.cuda()``, ``.to("cuda")``) is redirected to this device
  by a ``TorchFunctionMode``; ``torch.range`` does not dispatch through such modes, so it is wrapped
  while the mode is active. A request it missed would raise here (no CUDA), so a step that runs is
  a step that was fully redirected; the check prints the call sites it redirected. The mode sees
  every torch call of their step, and its Python overhead, measured and printed, is part of the
  reference's time;
- ``easydict`` and ``six`` (their ``config.py`` imports them) get minimal stand-ins if missing.

Their ``Resnet50`` class is swapped, while ``GCA_HNG`` is built, for a stand-in that returns its
input (the pooled feature): building a ResNet-50 only to drop it would take seconds and change this
process's malloc state and peak-memory baseline. Downloads are refused (``pretrained=False``).
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types

import torch
from bench_step import FEATURES, TRAIN_CLASSES
from bench_step import build as build_ours
from common import (
    add_malloc_argument,
    benchmark_parser,
    default_device,
    load_average,
    measure_in_child,
    measure_step,
    native_bf16,
    print_table,
    report_machine,
)

from gca_pyg.runtime import retain_freed_memory

REPOSITORY = "https://github.com/PWenJay/GCA-HNG"
REFERENCE_CONFIG = "scripts/cfgs/RES_CUB200.yml"
REFERENCE_FILES = (
    "config.py",
    "scripts/models.py",
    "scripts/loss.py",
    "scripts/utils.py",
    "scripts/graph_generator.py",
    "scripts/backbone.py",
    REFERENCE_CONFIG,
)
# The running means of J_m and J_gen that train.py passes after the first epoch, the values
# bench_step.py gives our trainer: J_syn carries weight (e^(-beta/J_gen) < 1) and the hardness
# e^(-alpha/J_m) is below 1.
MEAN_METRIC_LOSS, MEAN_GENERATOR_LOSS = 3.0, 30.0


def reference_problem(path) -> str:
    """Why `path` is not a usable checkout of the authors' code ('' if it is)."""
    if not path:
        return "no reference checkout given"
    missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return f"{path} is not a checkout of the authors' code (no {', '.join(missing)})"
    return ""


def reference_commit(path) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return "unknown commit"
    return result.stdout.strip() if result.returncode == 0 else "unknown commit"


# --- shims -------------------------------------------------------------------------------------


def _scatter_index(index, src, dim):
    """torch_scatter's broadcasting of a 1-D index along `dim` of `src`."""
    shape = [1] * src.dim()
    shape[dim] = -1
    return index.view(shape).expand_as(src)


def torch_scatter_standin() -> types.ModuleType:
    """The three functions of torch_scatter the reference imports, with its signatures.

    Sums and means are ``torch_geometric.utils.scatter``; ``scatter_max`` returns (values, arg-max)
    like torch_scatter: empty segments hold 0 and arg-max ``src.size(dim)``. Gradients of the
    maximum follow ``scatter_reduce`` (split among ties) where torch_scatter's go to the arg-max;
    without ties they agree. ``out=`` is not supported (the reference does not pass it).
    """
    from torch_geometric.utils import scatter

    def _reduce(src, index, dim, out, dim_size, reduce):
        if out is not None:
            raise NotImplementedError("bench_reference's torch_scatter stand-in takes no out=")
        if index.dim() != 1:
            raise NotImplementedError("bench_reference's torch_scatter stand-in takes 1-D indices")
        return scatter(src, index, dim=dim % src.dim(), dim_size=dim_size, reduce=reduce)

    def scatter_add(src, index, dim=-1, out=None, dim_size=None):
        return _reduce(src, index, dim, out, dim_size, "sum")

    def scatter_mean(src, index, dim=-1, out=None, dim_size=None):
        return _reduce(src, index, dim, out, dim_size, "mean")

    def scatter_max(src, index, dim=-1, out=None, dim_size=None):
        dim = dim % src.dim()
        values = _reduce(src, index, dim, out, dim_size, "max")
        with torch.no_grad():
            expanded = _scatter_index(index, src, dim)
            length = src.size(dim)
            position = torch.arange(length, device=src.device).view(
                [-1 if d == dim else 1 for d in range(src.dim())]
            )
            is_max = src == values.gather(dim, expanded)
            candidate = torch.where(is_max, position, length).expand_as(src)
            argmax = torch.full(values.shape, length, dtype=torch.long, device=src.device)
            argmax.scatter_reduce_(dim, expanded, candidate, "amin")
        return values, argmax

    module = types.ModuleType("torch_scatter")
    module.__doc__ = "bench_reference.py's stand-in for torch_scatter"
    module.scatter_add, module.scatter_mean, module.scatter_max = (
        scatter_add,
        scatter_mean,
        scatter_max,
    )
    return module


def install_import_shims() -> str:
    """Stand-ins for the reference's imports missing here; says where torch_scatter comes from."""
    if importlib.util.find_spec("easydict") is None:
        easydict = types.ModuleType("easydict")

        class EasyDict(dict):
            """Attribute access onto the items, all that their config.py relies on."""

            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name) from None

            def __setattr__(self, name, value):
                self[name] = value

        easydict.EasyDict = EasyDict
        sys.modules["easydict"] = easydict
    if importlib.util.find_spec("six") is None:
        six = types.ModuleType("six")
        six.string_types = (str,)
        sys.modules["six"] = six
    if importlib.util.find_spec("torch_scatter") is not None:
        import torch_scatter

        return f"torch_scatter {getattr(torch_scatter, '__version__', '')}".strip()
    sys.modules["torch_scatter"] = torch_scatter_standin()
    return "stand-in on torch_geometric.utils.scatter"


def refuse_downloads():
    def refuse(url, *args, **kwargs):
        raise RuntimeError(f"bench_reference: the reference tried to download {url}")

    torch.hub.download_url_to_file = refuse


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int device is CUDA's


class RedirectCuda(torch.overrides.TorchFunctionMode):
    """Sends the reference's CUDA requests to `device`: ``device=`` arguments of any torch
    function, ``Tensor.cuda()`` and ``Tensor.to(<cuda device>)``, and (wrapped while active, as it
    bypasses modes) ``torch.range``. Counts the calls it sees and records the redirected call
    sites under `root`."""

    def __init__(self, device: torch.device, root: str):
        super().__init__()
        self.device, self.root = device, os.path.abspath(root)
        self.calls = 0
        self.sites: set[str] = set()
        self._range = None

    def _note(self, depth: int = 2):
        frame = sys._getframe(depth)
        self.sites.add(f"{os.path.relpath(frame.f_code.co_filename, self.root)}:{frame.f_lineno}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda(device):
                kwargs = {**kwargs, "device": self.device}
                self._note()
        else:
            kwargs = {}
        if func is torch.Tensor.cuda:
            self._note()
            memory_format = kwargs.get("memory_format", torch.preserve_format)
            return args[0].to(self.device, memory_format=memory_format)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            self._note()
            args = (args[0], self.device, *args[2:])
        return func(*args, **kwargs)

    def __enter__(self):
        self._range = torch.range

        @functools.wraps(self._range)
        def range_here(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = self.device
                self._note()
            return self._range(*args, **kwargs)

        torch.range = range_here
        return super().__enter__()

    def __exit__(self, *exc):
        torch.range = self._range
        return super().__exit__(*exc)


class PooledResnet50(torch.nn.Module):
    """Their ``Resnet50(pretrained, bn_freeze, Pool)`` whose input is already the pooled feature."""

    def __init__(self, pretrained=False, bn_freeze=True, Pool=True):
        super().__init__()
        if pretrained:
            raise RuntimeError("bench_reference builds the reference without pretrained weights")
        self.num_ftrs = FEATURES

    def forward(self, x):
        return x


# --- the two steps -----------------------------------------------------------------------------


def shared_batch(num_nodes: int, per_class: int, device):
    """The same features and labels for both sides, class by class (``[a, a, a, b, b, b, ...]``),
    as our trainer and the authors' sampler make them."""
    generator = torch.Generator().manual_seed(1)
    num_classes = num_nodes // per_class
    features = torch.randn(num_nodes, FEATURES, generator=generator)
    classes = torch.randperm(max(TRAIN_CLASSES, num_classes), generator=generator)[:num_classes]
    return features.to(device), classes.repeat_interleave(per_class).to(device)


def their_gca_hng(models, cfg, n_class: int):
    """Their ``GCA_HNG`` from their config `cfg`, with the arguments their train.py passes."""
    return models.GCA_HNG(
        cfg,
        embedding_size=cfg.MODEL.EMBEDDING_SIZE,
        n_class=n_class,
        pretrained=cfg.MODEL.PRETRAINED,
        num_per_class=cfg.TRAIN.NUM_PER_CLASS,
        is_norm=cfg.MODEL.NORM,
        is_pooling=cfg.MODEL.POOLING,
        bn_freeze=cfg.SOLVER.BN_FREEZE,
        beta=cfg.LOSS.BETA,
        gnn_layers=cfg.MODEL.GNN_LAYER,
        softmax_factor=cfg.LOSS.SOFTMAX_FACTOR,
    )


def build_reference(config):
    """The authors' model, optimisers and batch as their train.py makes them; returns the step."""
    root = config["reference"]
    device = torch.device(config["device"])
    refuse_downloads()
    scatter_source = install_import_shims()
    sys.path.insert(0, root)
    import config as reference_config
    from scripts import models

    for module in (reference_config, models):
        # an installed package named config or scripts would shadow theirs
        if not os.path.abspath(module.__file__).startswith(os.path.join(root, "")):
            raise RuntimeError(f"imported {module.__file__}, not the reference's {module.__name__}")
    torch.manual_seed(0)
    num_nodes, per_class = config["num_nodes"], config.get("per_class", 3)
    num_classes = num_nodes // per_class
    cfg = reference_config.cfg
    reference_config.cfg_from_file(os.path.join(root, REFERENCE_CONFIG))
    cfg.MODEL.EMBEDDING_SIZE = config["dim"]
    cfg.MODEL.PRETRAINED = False
    cfg.TRAIN.NUM_PER_CLASS, cfg.TRAIN.NUM_SAMPLED_CLASSES = per_class, num_classes
    redirect = RedirectCuda(device, root) if device.type != "cuda" else contextlib.nullcontext()
    original_resnet = models.Resnet50
    models.Resnet50 = PooledResnet50
    try:
        model = their_gca_hng(models, cfg, max(TRAIN_CLASSES, num_classes)).to(device)
    finally:
        models.Resnet50 = original_resnet
    if not isinstance(model.feature_extractor.backbone, PooledResnet50):
        raise RuntimeError(f"the reference's backbone is {cfg.MODEL.BACKBONE}, not Resnet50")

    # train.py's optimisers.
    adamw, solver = torch.optim.AdamW, cfg.SOLVER
    optimizers = {
        "c": adamw(
            [
                {"params": model.feature_extractor.backbone.parameters(), "lr": solver.BASE_LR},
                {
                    "params": model.feature_extractor.fc.parameters(),
                    "lr": solver.BASE_LR * solver.EMBEDDING_RATIO,
                },
            ],
            lr=solver.BASE_LR,
            weight_decay=solver.WEIGHT_DECAY,
        ),
        "s": adamw(model.softmax_classifier.parameters(), lr=solver.CLASSIFIER_LR),
        "gnn": adamw(model.gnn.parameters(), lr=solver.GNN_LR, weight_decay=solver.WEIGHT_DECAY),
    }
    model.train()

    # train.py puts the samples of each class K apart: [a, b, c, ..., a, b, c, ...].
    features, labels = shared_batch(num_nodes, per_class, device)
    features = torch.cat([features[k::per_class] for k in range(per_class)])
    labels = torch.cat([labels[k::per_class] for k in range(per_class)])

    def step():
        with redirect:
            return model(
                features,
                labels,
                MEAN_METRIC_LOSS,
                MEAN_GENERATOR_LOSS,
                optimizers["c"],
                optimizers["s"],
                optimizers["gnn"],
            )

    return model, optimizers, step, redirect, scatter_source


def build_our_step(config):
    trainer, _, _, device = build_ours(config)
    features, labels = shared_batch(config["num_nodes"], config.get("per_class", 3), device)

    def step():
        trainer.training_step(features, labels)

    return step, device


# --- what the children do ----------------------------------------------------------------------


def check_reference(config):
    """One reference step from fresh parameters: every loss finite, and every update moved its
    parameters by what AdamW's first step moves them (≈ lr), not just by weight decay. The GNN's
    node head only learns from J_gce (first GNN update), its edge head only from J_gen (second)."""
    model, optimizers, step, redirect, scatter_source = build_reference(config)
    lr = {name: optimizer.param_groups[-1]["lr"] for name, optimizer in optimizers.items()}
    groups = {
        "embedding head (metric update)": (model.feature_extractor.fc, lr["c"]),
        "classifier (classifier update)": (model.softmax_classifier, lr["s"]),
        "GNN node head (GNN update on J_gce)": (model.gnn.cls, lr["gnn"]),
        "GNN edge head (GNN update on J_gen)": (model.gnn.fc, lr["gnn"]),
        "GNN layers": (model.gnn.gnn, lr["gnn"]),
    }
    before = {
        name: [p.detach().clone() for p in module.parameters()]
        for name, (module, _) in groups.items()
    }
    jgen, jmetric, jm, ce, e_bj, metrics = step()
    losses = {
        **metrics,
        "jgen": jgen.item(),
        "jmetric": jmetric.item(),
        "jm": jm.item(),
        "ce": ce.item(),
    }
    problems = [
        f"loss {name} = {value}" for name, value in losses.items() if not math.isfinite(value)
    ]
    if not 0 < e_bj < 1 or not losses["J_syn"] > 0:
        problems.append(f"synthesis carries no weight (e^(-beta/J_gen) = {e_bj})")
    moved = {}
    for name, (module, rate) in groups.items():
        after = [p.detach() for p in module.parameters()]
        if not all(torch.isfinite(p).all() for p in after):
            problems.append(f"{name}: non-finite parameters")
            continue
        moved[name] = max((a - b).abs().max().item() for a, b in zip(after, before[name]))
        if moved[name] < 0.5 * rate:
            problems.append(f"{name}: moved by {moved[name]:.2g} < lr/2 = {rate / 2:.2g}")
    if problems:
        raise AssertionError(
            "the reference step is not the full alternating update: " + "; ".join(problems)
        )
    sites = sorted(getattr(redirect, "sites", ()))
    print(json.dumps({"losses": losses, "moved": moved, "sites": sites, "scatter": scatter_source}))


def mode_overhead_us(redirect, device, calls: int = 20000) -> float:
    """Microseconds the redirecting mode adds to one torch call (a small tensor add)."""
    x = torch.ones(8, device=device)

    def loop():
        start = time.perf_counter()
        for _ in range(calls):
            x.add(x)
        return time.perf_counter() - start

    loop()
    plain = min(loop() for _ in range(3))
    with redirect:
        loop()
        redirected = min(loop() for _ in range(3))
    return max(0.0, redirected - plain) / calls * 1e6


def run_child(config):
    if config["malloc"] == "retain":
        retain_freed_memory()
    if config["impl"] == "check":
        return check_reference(config)
    if config["impl"] == "reference":
        _, _, step, redirect, _ = build_reference(config)
        device = torch.device(config["device"])
        seen = []  # the mode's call count after each step

        def counted_step():
            step()
            seen.append(getattr(redirect, "calls", 0))

        result = measure_step(counted_step, device, config["repeats"])
        if isinstance(redirect, RedirectCuda):
            # the timed steps only: the first also creates the optimisers' state
            calls = (seen[-1] - seen[0]) / (len(seen) - 1)
            overhead = mode_overhead_us(redirect, device)
            result.update(mode_calls=calls, mode_ms=calls * overhead / 1e3)
    else:
        step, device = build_our_step(config)
        result = measure_step(step, device, config["repeats"])
    print(json.dumps(result))


def main():
    parser = benchmark_parser(__doc__.splitlines()[0], sizes=[81], repeats=5)
    parser.add_argument(
        "--reference", metavar="DIR", help=f"a checkout of {REPOSITORY} (the authors' code)"
    )
    parser.add_argument(
        "--per-class", type=int, default=3, help="samples per class K; sizes are multiples of it"
    )
    add_malloc_argument(parser)
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    problem = reference_problem(args.reference)
    if problem:
        print(f"skipped: {problem}; pass --reference DIR, a checkout of {REPOSITORY}")
        return
    bad = [n for n in args.sizes if n % args.per_class or n // args.per_class < 2]
    if args.per_class < 2 or bad:
        parser.error(
            f"every size must be a multiple of --per-class {args.per_class} (>= 2), with "
            f"at least 2 classes; got {bad or args.sizes}"
        )

    reference = os.path.abspath(args.reference)
    device = default_device()
    load_before = load_average()
    report_machine(device)
    base = {
        "device": str(device),
        "dim": args.dim,
        "per_class": args.per_class,
        "reference": reference,
        "repeats": args.repeats,
    }
    check = measure_in_child(
        __file__, {**base, "impl": "check", "num_nodes": args.sizes[0], "malloc": "system"}
    )
    if "error" in check:
        sys.exit(f"reference check failed: {check['error']}")
    print(f"reference: {reference} ({reference_commit(reference)}), {REFERENCE_CONFIG}")
    print(f"  torch_scatter: {check['scatter']}")
    if check["sites"]:
        print(f"  redirected to {device}: {', '.join(check['sites'])}")
    moved = ", ".join(f"{name} {value:.1e}" for name, value in check["moved"].items())
    print(f"  check, one step at N={args.sizes[0]}: losses finite; largest parameter move: {moved}")

    rows, skipped, notes = [], [], []
    for num_nodes in args.sizes:
        classes = f"{num_nodes // args.per_class}x{args.per_class}"
        for malloc in args.malloc:
            runs = [("reference", "fp32")] + [("ours", dtype) for dtype in args.dtypes]
            reference_ms = None
            for impl, dtype in runs:
                name = f"N={num_nodes} {impl} {dtype} {malloc}"
                if dtype == "bf16" and not native_bf16(device) and not args.force_bf16:
                    skipped.append(name)
                    continue
                result = measure_in_child(
                    __file__,
                    {
                        **base,
                        "impl": impl,
                        "num_nodes": num_nodes,
                        "dtype": dtype,
                        "malloc": malloc,
                    },
                )
                print(f"  measured {name}", file=sys.stderr)
                if "error" in result:
                    rows.append(
                        [num_nodes, classes, impl, dtype, malloc, result["error"], "", "", ""]
                    )
                    continue
                if impl == "reference":
                    reference_ms = result["ms"]
                    if "mode_ms" in result:
                        notes.append(
                            f"N={num_nodes} {malloc}: the device shim's mode saw "
                            f"{result['mode_calls']:.0f} torch calls/step, about "
                            f"{result['mode_ms']:.1f} ms of the reference's ms/step"
                        )
                ratio = f"{reference_ms / result['ms']:.1f}x" if reference_ms else ""
                rows.append(
                    [
                        num_nodes,
                        classes,
                        impl,
                        dtype,
                        malloc,
                        f"{result['ms']:.0f}",
                        f"{result['peak_mb']:.0f}",
                        f"{result['gflop']:.1f}",
                        ratio,
                    ]
                )
    print_table(
        [
            "N",
            "C x K",
            "step",
            "dtype",
            "malloc",
            "ms/step",
            "peak MB",
            "GFLOP/step",
            "ref fp32 / this",
        ],
        rows,
    )
    for note in notes:
        print(note)
    print(f"load average before: {load_before}; after: {load_average()} (others' work slows rows)")
    if skipped:
        print(
            f"skipped (no native bf16 matmul here; --force-bf16 to measure anyway): "
            f"{', '.join(skipped)}"
        )


if __name__ == "__main__":
    main()
