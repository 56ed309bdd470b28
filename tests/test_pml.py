"""gca_pyg.pml: the generator in a pytorch-metric-learning loop, and the example that uses it."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gca_pyg.graph import BatchGraph
from gca_pyg.model import GCAHNG
from gca_pyg.pml import INITIAL_MEAN_LOSS, GCANegativeGenerator
from gca_pyg.schema import NetConfig
from gca_pyg.synthesis import draw_mix

from tiny_model import TinyBackbone

losses = pytest.importorskip("pytorch_metric_learning.losses")

ROOT = Path(__file__).resolve().parent.parent


def batch(classes=4, per_class=3, dim=16):
    labels = torch.arange(classes).repeat_interleave(per_class)
    embeddings = torch.randn(classes * per_class, dim) + 2 * torch.eye(dim)[labels]
    return embeddings.requires_grad_(), labels


def test_negatives_come_as_the_trailing_arguments_of_a_pml_loss():
    embeddings, labels = batch()  # 4 classes x 3
    generator = GCANegativeGenerator(16, num_classes=6, num_layers=1, heads=2)
    pairs, references, reference_labels = generator(embeddings, labels)
    anchors, positives, negative_anchors, negatives = pairs
    assert references.shape == (12 + 12 * 3, 16) and reference_labels.shape == (12 + 12 * 3,)
    assert torch.equal(references[:12], embeddings) and torch.equal(reference_labels[:12], labels)
    # Synthetic rows grouped by anchor, one per other class, ascending.
    assert torch.equal(
        reference_labels[12:].view(12, 3),
        torch.stack([torch.tensor([c for c in range(4) if c != y]) for y in labels]),
    )
    # Every anchor with each real positive, once; each synthetic negative with its own anchor only.
    positive_pairs = list(zip(anchors.tolist(), positives.tolist()))
    expected_positives = {
        (a, p) for a in range(12) for p in range(12) if p != a and labels[p] == labels[a]
    }
    assert set(positive_pairs) == expected_positives and len(positive_pairs) == 12 * 2
    negative_pairs = list(zip(negative_anchors.tolist(), negatives.tolist()))
    assert negative_pairs == [(a, 12 + 3 * a + j) for a in range(12) for j in range(3)]
    # A triplet loss makes of them every (anchor, positive, own synthetic negative), once.
    from pytorch_metric_learning.utils import loss_and_miner_utils

    triplets = loss_and_miner_utils.convert_to_triplets(pairs, labels, reference_labels)
    triplets = list(zip(*(t.tolist() for t in triplets)))
    expected = {(a, p, 12 + 3 * a + j) for a, p in expected_positives for j in range(3)}
    assert set(triplets) == expected and len(triplets) == len(expected)
    loss = losses.TripletMarginLoss(margin=0.1)(
        embeddings, labels, pairs, references, reference_labels
    )
    assert torch.isfinite(loss) and loss > 0


def test_the_users_loss_trains_the_model_and_never_the_generator():
    embeddings, labels = batch()
    generator = GCANegativeGenerator(16, num_classes=4, num_layers=1, heads=2)
    losses.TripletMarginLoss(margin=0.5)(
        embeddings, labels, *generator(embeddings, labels)
    ).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in generator.parameters())


def test_the_generators_loss_trains_the_generator_and_never_the_model():
    embeddings, labels = batch()
    generator = GCANegativeGenerator(16, num_classes=4, num_layers=1, heads=2)
    generator.loss(embeddings, labels).backward()
    assert embeddings.grad is None
    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_update_sets_the_hardness_and_the_synthetic_weight():
    embeddings, labels = batch()
    generator = GCANegativeGenerator(16, num_classes=4, num_layers=1, heads=2, alpha=0.2, beta=3)
    assert generator.hardness == pytest.approx(math.exp(-0.2 / INITIAL_MEAN_LOSS))
    assert generator.synthetic_weight < 1e-5
    graph = BatchGraph.build(labels)
    generator_losses = []
    for seed in range(2):  # the J_gen of each call, from the same dropout and merge draws
        torch.manual_seed(seed)
        generator_losses.append(
            generator.generator.generator_loss(embeddings, graph)["J_gen"].item()
        )
        torch.manual_seed(seed)
        generator.loss(embeddings, labels)
    generator.update(0.4)
    assert generator.hardness == pytest.approx(math.exp(-0.2 / 0.4))
    mean_generator_loss = sum(generator_losses) / 2
    assert generator.synthetic_weight == pytest.approx(1 - math.exp(-3 / mean_generator_loss))
    generator.update(0.4)  # no loss() since: J̄_gen stays, the next epoch starts afresh
    assert generator.synthetic_weight == pytest.approx(1 - math.exp(-3 / mean_generator_loss))
    # The schedule travels with the state_dict.
    restored = GCANegativeGenerator(16, num_classes=4, num_layers=1, heads=2, alpha=0.2, beta=3)
    restored.load_state_dict(generator.state_dict())
    assert restored.hardness == generator.hardness
    assert restored.synthetic_weight == generator.synthetic_weight
    # Harder negatives as the loss falls: closer to their anchors.
    generator.eval()
    far = generator(embeddings, labels).ref_emb[12:]
    generator.update(0.01)
    near = generator(embeddings, labels).ref_emb[12:]
    anchors = embeddings.repeat_interleave(3, dim=0)
    assert (near - anchors).norm(dim=1).mean() < (far - anchors).norm(dim=1).mean()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g, z, y: g(z[:, :8], y), r"embeddings of shape \[N, 16\], got \(12, 8\)"),
        (lambda g, z, y: g(z, y[:-1]), r"one label per embedding \(12\)"),
        (lambda g, z, y: g(z, y + 5), r"labels must be training class ids in 0\.\.5, got 5\.\.8"),
        (  # class 3 has 2 samples, the others 3
            lambda g, z, y: g(z[:-1], y[:-1]),
            r"class-balanced batch .* class counts \{0: 3, 1: 3, 2: 3, 3: 2\}",
        ),
        (lambda g, z, y: g.update(float("nan")), r"positive finite number; got nan"),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    embeddings, labels = batch()
    generator = GCANegativeGenerator(16, num_classes=6, num_layers=1, heads=2)
    with pytest.raises(ValueError, match=message):
        call(generator, embeddings, labels)


def test_the_front_end_gives_the_trainers_negatives_and_losses_on_the_same_tensors():
    torch.manual_seed(0)
    model = GCAHNG(TinyBackbone(), 6, 16, net=NetConfig(num_layers=2, heads=4, dropout=0.0))
    model.generator.mean_metric_loss, model.generator.mean_generator_loss = 3.0, 2.0
    front_end = GCANegativeGenerator(16, 6, num_layers=2, heads=4, dropout=0.0)
    front_end.load_state_dict(model.generator.state_dict())  # weights and schedule
    assert front_end.hardness == model.generator.hardness == pytest.approx(math.exp(-5 / 3))
    model.train()
    labels = torch.tensor([4, 1, 4, 0, 1, 0, 4, 0, 1])
    embeddings = model(torch.randn(9, 20))
    graph = BatchGraph.build(labels)

    torch.manual_seed(1)
    mix = draw_mix(3)  # the trainer's coefficients are the front end's draw
    negatives = model.generator(embeddings, graph, mix).negatives
    torch.manual_seed(1)
    _, references, reference_labels = front_end(embeddings, labels)
    order = torch.argsort(negatives.anchor * 3 + negatives.class_index)
    assert torch.equal(references[9:], negatives.embeddings[order])
    assert torch.equal(reference_labels[9:], negatives.labels(graph.classes)[order])

    torch.manual_seed(2)
    mix = draw_mix(3)
    expected = model.generator.generator_loss(embeddings, graph, mix, node_loss=True)
    expected_cls = model.classifier_loss(embeddings, labels)["J_cls"]
    torch.manual_seed(2)
    actual = front_end.loss(embeddings, labels)
    assert actual.item() == pytest.approx(
        (expected["J_gen"] + expected["J_gce"] + expected_cls).item(), rel=1e-6
    )
    front_end.update(1.5)
    assert front_end.synthetic_weight == pytest.approx(1 - math.exp(-20 / expected["J_gen"].item()))


def test_the_example_trains_with_and_without_the_generator(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "GCA_PYG_CACHE": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pml_triplet.py"),
            "--epochs",
            "1",
            "--seeds",
            "0",
            "--max-steps",
            "3",
            "--classes-per-batch",
            "10",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (row,) = re.findall(
        r"^\s+0 \|\s+(\d+\.\d\d) \|\s+(\d+\.\d\d) \|\s+([+-]\d+\.\d\d)$", result.stdout, flags=re.M
    )
    plain, generated, difference = map(float, row)
    assert 0 < plain <= 100 and 0 < generated <= 100
    assert difference == pytest.approx(generated - plain, abs=0.011)
