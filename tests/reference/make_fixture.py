"""Writes tests/reference/fixture.pt: the authors' GCA_HNG (PWenJay/GCA-HNG) run on stand-in weights
and images, for tests/test_convert.py to compare our converted model with, without their code.

    git clone https://github.com/PWenJay/GCA-HNG /tmp/GCA-HNG
    git clone https://github.com/facebookresearch/dino /tmp/dino
    python tests/reference/make_fixture.py --reference /tmp/GCA-HNG --dino /tmp/dino

For each of their three backbones, with their config of CUB (``RES_CUB200.yml``,
``G_CUB200.yml``, ``DINO_CUB200.yml``) shrunk to a tiny problem (C × K = 3 × 2 images of 64 px, 32
px for the ViT; embedding size 16; 5 training classes), it builds their ``GCA_HNG`` unmodified,
loads deterministic stand-in weights into it (``reference_weights.stand_in_state_dict``: every
value a hash of its position, so the test rebuilds the same state dict instead of storing 100 MB),
and runs the first half of their ``GCA_HNG.forward`` — ``feature_extractor``, ``gg.get_graph`` and
``gnn`` — in eval mode and in training mode (their ``train.py``'s: BatchNorm2d frozen where
``BN_FREEZE``, dropout set to 0 so that both sides are deterministic). It stores the names and
shapes of their state dict, the embeddings, node logits and fusion weights, and, after the
training-mode pass, the running statistics of the BatchNorms that pass updated.

Their code needs CUDA and torch_scatter: it runs on the CPU under the stand-ins of
``benchmarks/bench_reference.py`` (a torch_scatter on PyG, the CUDA device redirected), without
editing their files. Without internet, two of their calls are served locally, without changing
what they build:

- ``torch.hub.load("facebookresearch/dino:main", "dino_vits16", pretrained=False)`` loads
  ``dino_vits16`` from the DINO checkout given by ``--dino`` (``source="local"``): DINO's own
  ``VisionTransformer``, with random weights, as the hub would;
- GoogLeNet: their ``googlenet(pretrained=True)`` downloads ImageNet weights; the script calls
  ``googlenet(pretrained=False)`` and sets what ``pretrained=True`` sets besides the weights
  (``transform_input=True``, auxiliary heads removed), the network of their released models.
"""

import argparse
import importlib
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.dirname(HERE)]

import bench_reference  # noqa: E402  (benchmarks/: the stand-ins for CUDA and torch_scatter)

from reference_weights import manifest_of, stand_in_images, stand_in_state_dict  # noqa: E402

FIXTURE = os.path.join(HERE, "fixture.pt")
SEED = 2025
CLASSES_PER_BATCH, PER_CLASS, EMBEDDING, TRAIN_CLASSES = 3, 2, 16, 5
#: Their backbone -> (their config, our recipe, image size).
CASES = {
    "resnet50": ("RES_CUB200.yml", "cub", 64),
    "googlenet": ("G_CUB200.yml", "cub_googlenet", 64),
    "dino": ("DINO_CUB200.yml", "cub_dino", 32),
}
#: Labels in the order their train.py feeds a batch: the k-th samples of all classes, k = 0, 1.
LABELS = torch.tensor([1, 3, 4] * PER_CLASS)


def commit(path):
    done = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def build_theirs(root, dino, name, cfg_module, models):
    """Their GCA_HNG for case `name`, as their train.py builds it (no pretrained weights)."""
    yml, _, _ = CASES[name]
    cfg_module = importlib.reload(cfg_module)  # their defaults, then their yml, as train.py
    cfg = cfg_module.cfg
    cfg_module.cfg_from_file(os.path.join(root, "scripts", "cfgs", yml))
    cfg.MODEL.PRETRAINED = False
    cfg.MODEL.EMBEDDING_SIZE = EMBEDDING
    cfg.TRAIN.NUM_PER_CLASS, cfg.TRAIN.NUM_SAMPLED_CLASSES = PER_CLASS, CLASSES_PER_BATCH
    hub_load = torch.hub.load

    def local_dino(repository, model, *args, **kwargs):
        assert repository == "facebookresearch/dino:main", repository
        return hub_load(dino, model, *args, source="local", **kwargs)

    torch.hub.load = local_dino
    try:
        torch.manual_seed(0)
        model = bench_reference.their_gca_hng(models, cfg, TRAIN_CLASSES)
    finally:
        torch.hub.load = hub_load
    if name == "googlenet":  # what googlenet(pretrained=True) sets besides the weights
        backbone = model.feature_extractor.backbone
        backbone.transform_input, backbone.aux_logits = True, False
        del backbone.aux1, backbone.aux2
    return model, cfg


def run_theirs(model, cfg, weights, images, mode, redirect):
    """Embeddings, node logits and fusion weights of their forward; BatchNorm running statistics
    after it."""
    model.load_state_dict(weights, strict=True)
    model.train(mode == "train")
    if mode == "train" and cfg.SOLVER.BN_FREEZE:  # as their train.py does every epoch
        for module in model.feature_extractor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad(), redirect:
        embeddings = model.feature_extractor(images)
        edge_attr, edge_index, nodes = model.gg.get_graph(embeddings)
        node_logits, fusion = model.gnn(nodes, edge_index, edge_attr)
    count = len(images)
    pairs = torch.stack(torch.meshgrid(torch.arange(count), torch.arange(count), indexing="ij"))
    assert torch.equal(edge_index.cpu().T, pairs.reshape(2, -1)), "edges are not row-major pairs"
    outputs = {
        "embeddings": embeddings,
        "node_logits": node_logits,
        "fusion": fusion.reshape(count, count, -1),
    }
    if mode == "train":
        outputs["running"] = {
            key: value.clone()
            for key, value in model.state_dict().items()
            if key.endswith(("running_mean", "running_var"))
            and key.startswith(("feature_extractor.fc.", "gnn."))
        }
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of PWenJay/GCA-HNG")
    parser.add_argument("--dino", required=True, help="a checkout of facebookresearch/dino")
    parser.add_argument("--out", default=FIXTURE)
    args = parser.parse_args()
    root, dino = os.path.abspath(args.reference), os.path.abspath(args.dino)
    problem = bench_reference.reference_problem(root)
    if problem or not os.path.isfile(os.path.join(dino, "hubconf.py")):
        sys.exit(problem or f"{dino} is not a checkout of facebookresearch/dino (no hubconf.py)")

    bench_reference.refuse_downloads()
    scatter = bench_reference.install_import_shims()
    sys.path.insert(0, root)
    import config as cfg_module
    from scripts import models

    device = torch.device("cpu")
    redirect = bench_reference.RedirectCuda(device, root)
    cases = {}
    for name, (yml, recipe, size) in CASES.items():
        model, cfg = build_theirs(root, dino, name, cfg_module, models)
        manifest = manifest_of(model.state_dict())
        weights = stand_in_state_dict(manifest, SEED)
        images = stand_in_images(len(LABELS), size, SEED)
        cases[name] = {
            "their_config": f"scripts/cfgs/{yml}",
            "recipe": recipe,
            "image_size": size,
            "manifest": manifest,
            "outputs": {
                mode: run_theirs(model, cfg, weights, images, mode, redirect)
                for mode in ("eval", "train")
            },
        }
        print(f"{name}: {len(manifest)} tensors; their {yml} run in eval and training mode")
    torch.save(
        {
            "seed": SEED,
            "labels": LABELS,
            "classes_per_batch": CLASSES_PER_BATCH,
            "samples_per_class": PER_CLASS,
            "embedding_size": EMBEDDING,
            "train_classes": TRAIN_CLASSES,
            "cases": cases,
            "made_with": {
                "reference": commit(root),
                "dino": commit(dino),
                "torch": str(torch.__version__),
                "torch_scatter": scatter,
            },
        },
        args.out,
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
