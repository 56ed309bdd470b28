import math

import pytest
import torch

from gca_pyg.generator import synthesize_batch
from gca_pyg.losses import (
    diversity_loss,
    npair_loss,
    similarity_loss,
    synthetic_class_loss,
    synthetic_npair_loss,
)


def log_softmax_at(logits, target):
    return logits[target] - math.log(sum(math.exp(v) for v in logits))


def test_npair_loss_by_hand():
    # Two classes, K = 2; within a class the first sample in batch order is the anchor.
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0], [0.5, 0.0]])
    y = torch.tensor([7, 9, 7, 9])
    anchors = [z[0], z[1]]
    positives = [z[2], z[3]]
    ce = 0.0
    for c, anchor in enumerate(anchors):
        logits = [float(anchor @ p) for p in positives]
        ce -= log_softmax_at(logits, c)
    ce /= 2
    l2 = (z[[0, 1]].square().sum(1).mean() + z[[2, 3]].square().sum(1).mean()).item()
    expected = ce + 0.25 * 3e-3 * l2
    assert npair_loss(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_npair_loss_ignores_where_classes_sit_but_not_the_order_within_them():
    z = torch.randn(12, 5)
    y = torch.arange(4).repeat(3)  # classes interleaved
    class_major = torch.arange(12).view(3, 4).t().reshape(-1)  # same order within each class
    assert torch.allclose(npair_loss(z, y), npair_loss(z[class_major], y[class_major]))
    first_two_swapped = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7, 8, 9, 10, 11])
    assert not torch.allclose(npair_loss(z, y), npair_loss(z[first_two_swapped], y))


def test_synthetic_npair_loss_by_hand():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    synthetic, synthetic_labels, anchor_index = synthesize_batch(
        z, y, torch.rand(6, 6, 4, dtype=torch.float64), 0.5
    )
    loss = synthetic_npair_loss(z, y, synthetic, synthetic_labels, anchor_index)
    total, candidate_norms = 0.0, []
    for i in range(6):
        positive = z[i ^ 1]  # K = 2: the positive is the other sample of the class
        candidates = [positive] + [synthetic[r] for r in range(12) if anchor_index[r] == i]
        total -= log_softmax_at([float(z[i] @ c) for c in candidates], 0)
        candidate_norms += [float(c.square().sum()) for c in candidates]
    l2 = z.square().sum(1).mean().item() + sum(candidate_norms) / len(candidate_norms)
    assert loss.item() == pytest.approx(total / 6 + 0.25 * 3e-3 * l2, rel=1e-9)
    # Rows may come in any order: the loss reads the anchor index.
    perm = torch.randperm(12)
    shuffled = synthetic_npair_loss(
        z, y, synthetic[perm], synthetic_labels[perm], anchor_index[perm]
    )
    assert torch.allclose(shuffled, loss)


def test_synthetic_npair_loss_ignores_own_class_rows_and_needs_every_other_class_once():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    fusion = torch.rand(6, 6, 4, dtype=torch.float64)
    mix = torch.rand(2, 1, dtype=torch.float64)
    others = synthesize_batch(z, y, fusion, 0.5, mix=mix)
    everything = synthesize_batch(z, y, fusion, 0.5, mix=mix, include_own_class=True)
    assert torch.allclose(
        synthetic_npair_loss(z, y, *everything), synthetic_npair_loss(z, y, *others)
    )
    synthetic, labels, anchors = others
    with pytest.raises(ValueError, match="exactly one synthetic negative"):
        synthetic_npair_loss(z, y, synthetic[1:], labels[1:], anchors[1:])
    with pytest.raises(ValueError, match="exactly one synthetic negative"):
        synthetic_npair_loss(
            z,
            y,
            torch.cat([synthetic, synthetic[:1]]),
            torch.cat([labels, labels[:1]]),
            torch.cat([anchors, anchors[:1]]),
        )


def test_synthetic_class_loss_by_hand():
    classifier = torch.nn.Linear(3, 4)
    synthetic = torch.randn(5, 3)
    labels = torch.tensor([0, 3, 1, 1, 2])
    logits = classifier(synthetic)
    expected = -sum(log_softmax_at(logits[i].tolist(), int(labels[i])) for i in range(5)) / 5
    loss = synthetic_class_loss(synthetic, labels, classifier, scale=20.0)
    assert loss.item() == pytest.approx(20 * expected, rel=1e-5)


def test_similarity_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    synthetic = torch.tensor([[1.0, 1.0], [0.0, -2.0], [3.0, 0.0]])
    anchor_index = torch.tensor([0, 0, 1])
    cosines = [1 / math.sqrt(2), 0.0, 0.0]
    expected = sum(1 - c for c in cosines) / (2 * 3)  # N * C pairs, same-class ones count 0
    assert similarity_loss(z, synthetic, anchor_index, num_classes=3).item() == pytest.approx(
        expected
    )
    # A mask leaves rows out (e.g. the anchors' own-class rows).
    masked = similarity_loss(
        z, synthetic, anchor_index, num_classes=3, mask=torch.tensor([True, False, True])
    )
    assert masked.item() == pytest.approx((1 - cosines[0] + 1 - cosines[2]) / 6)


def test_diversity_loss_by_hand():
    fusion = torch.zeros(2, 2, 1)
    fusion[0, 0], fusion[0, 1] = 0.2, 0.6  # row 0 mean 0.4: deviations 0.2, 0.2
    fusion[1, :] = 0.5  # row 1 constant: no spread
    expected = 0.01 * (1 - math.sqrt((0.04 + 0.04) / 4))
    assert diversity_loss(fusion).item() == pytest.approx(expected)
    constant = torch.full((3, 3, 2), 0.5, requires_grad=True)
    diversity_loss(constant).backward()
    assert torch.isfinite(constant.grad).all()


def test_diversity_loss_of_undirected_pairs_equals_the_dense_one():
    from gca_pyg.graph import complete_edge_index, to_dense_edges

    pairs = complete_edge_index(5, undirected=True)
    weights = torch.rand(pairs.size(1), 3, dtype=torch.float64, requires_grad=True)
    dense = to_dense_edges(weights, pairs, 5, undirected=True)
    expected = diversity_loss(dense)
    actual = diversity_loss(weights, edge_index=pairs, num_nodes=5)
    assert torch.allclose(actual, expected)
    (grad_expected,) = torch.autograd.grad(expected, weights)
    (grad_actual,) = torch.autograd.grad(actual, weights)
    assert torch.allclose(grad_actual, grad_expected)
