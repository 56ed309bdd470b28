"""The GCA-HNG generator inside a pytorch-metric-learning loop, on the embedded demo set.

Trains a small CNN with PML's ``TripletMarginLoss`` twice per seed — alone, and with the synthetic
hard negatives of :class:`gca_pyg.pml.GCANegativeGenerator` (each anchor against its real positives
and the negatives made for it) — and prints Recall@1 on the unseen test classes::

    pip install -e ".[pml]"
    python examples/pml_triplet.py                    # 8 epochs, seeds 0 1 2: an hour on a CPU
    python examples/pml_triplet.py --epochs 2 --seeds 0

``--label-matching`` instead hands the synthetic samples to PML as references labelled with the
class they stand for and mines the hardest positive and negative of each anchor among them
(``BatchHardMiner``): a synthetic sample is then also a positive for the anchors of its class.
"""

import argparse
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from gca_pyg.backbones import build_backbone
from gca_pyg.data import (
    ClassBalancedBatchSampler,
    demo_test_transform,
    demo_train_transform,
    get_dataset,
)
from gca_pyg.metrics import retrieval_metrics
from gca_pyg.pml import GCANegativeGenerator

try:
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
except ImportError:
    sys.exit('error: this example needs pytorch-metric-learning: pip install "gca-pyg[pml]"')

EMBEDDING_SIZE = 64


def embedder() -> torch.nn.Module:
    backbone = build_backbone("small_cnn", pretrained="none")
    return torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, EMBEDDING_SIZE))


@torch.no_grad()
def recall_at_1(model: torch.nn.Module, test) -> float:
    model.eval()
    embeddings = torch.cat([model(images) for images, _ in DataLoader(test, batch_size=500)])
    model.train()
    return retrieval_metrics(embeddings, test.labels, ks=[1])["recall@1"]


def train(seed: int, with_generator: bool, args, train_set, test_set) -> float:
    torch.manual_seed(seed)
    model = embedder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = TripletMarginLoss(margin=args.margin)
    miner = BatchHardMiner()
    generator = GCANegativeGenerator(EMBEDDING_SIZE, train_set.num_classes, alpha=args.alpha)
    generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=args.generator_lr)
    sampler = ClassBalancedBatchSampler(train_set.labels, args.classes_per_batch, 3, seed=seed)
    steps = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        losses = []
        for images, labels in DataLoader(train_set, batch_sampler=sampler):
            embeddings = model(images)
            loss = loss_fn(embeddings, labels)
            total = loss
            if with_generator:
                references = generator(embeddings, labels)
                if args.label_matching:  # the synthetic samples alone, matched by label
                    negatives = references.ref_emb[labels.numel() :]
                    negative_labels = references.ref_labels[labels.numel() :]
                    hardest = miner(embeddings, labels, negatives, negative_labels)
                    synthetic = loss_fn(embeddings, labels, hardest, negatives, negative_labels)
                else:  # as negatives of their own anchors only
                    synthetic = loss_fn(embeddings, labels, *references)
                total = loss + generator.synthetic_weight * synthetic
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            if with_generator:
                generator_optimizer.zero_grad()
                generator.loss(embeddings, labels).backward()
                generator_optimizer.step()
            losses.append(loss.item())
            steps += 1
            if steps == args.max_steps:
                break
        if with_generator:
            generator.update(float(np.mean(losses)))
        if steps == args.max_steps:
            break
    return recall_at_1(model, test_set)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop each run after this many steps (a quick check)",
    )
    parser.add_argument("--classes-per-batch", type=int, default=27)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--generator-lr", type=float, default=3e-4)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.1,
        help="hardness h = exp(-alpha / mean triplet loss of the last epoch)",
    )
    parser.add_argument(
        "--label-matching",
        action="store_true",
        help="use the synthetic samples as references matched by label (hardest of each anchor)",
    )
    args = parser.parse_args(argv)
    train_set = get_dataset("demo", split="train", transform=demo_train_transform())
    test_set = get_dataset("demo", split="test", transform=demo_test_transform())

    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        plain = train(seed, False, args, train_set, test_set)
        generated = train(seed, True, args, train_set, test_set)
        rows.append((seed, plain, generated))
        print(
            f"seed {seed}: R@1 {100 * plain:.2f} without, {100 * generated:.2f} with the "
            f"generator ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )
    usage = "label matching, hardest mined" if args.label_matching else "own anchors' negatives"
    print(
        f"TripletMarginLoss(margin={args.margin}) on the demo set, {args.epochs} epochs, "
        f"alpha {args.alpha}, synthetic samples as {usage}; Recall@1 (%) on 100 unseen classes"
    )
    print("seed | without generator | with generator | difference")
    print("-----+-------------------+----------------+-----------")
    for seed, plain, generated in rows:
        print(
            f"{seed:>4} | {100 * plain:>17.2f} | {100 * generated:>14.2f} | "
            f"{100 * (generated - plain):>+10.2f}"
        )
    if len(rows) > 1:
        plain, generated = (np.array([row[i] for row in rows]) for i in (1, 2))
        print(
            f"mean | {100 * plain.mean():>17.2f} | {100 * generated.mean():>14.2f} | "
            f"{100 * (generated - plain).mean():>+10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
