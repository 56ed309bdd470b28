import pytest
import torch

from gca_pyg.generator import (HardNegativeGenerator, hardness_from_loss, synthesize_batch,
                               synthesize_negatives)


def row(*values):
    return torch.tensor([values], dtype=torch.float64)


def test_each_channel_is_scaled_by_its_own_ratio():
    anchor, positive, negative = row(0.0, 0.0), row(1.0, 0.0), row(3.0, 4.0)  # d+ = 1, d- = 5
    weights = row(0.5, 0.25)
    # r = (1 + (5 - 1) * lambda) / 5 = (0.6, 0.4)
    out = synthesize_negatives(anchor, positive, negative, weights, hardness=1.0)
    assert torch.allclose(out, row(1.8, 1.6))
    # hardness multiplies lambda: h = 0.5 gives r = (1 + 4 * (0.25, 0.125)) / 5 = (0.4, 0.3)
    out = synthesize_negatives(anchor, positive, negative, weights, hardness=0.5)
    assert torch.allclose(out, row(1.2, 1.2))


def test_zero_weight_puts_the_negative_at_the_positive_distance():
    anchor, positive = torch.randn(4, 8), torch.randn(4, 8)
    negative = anchor + 10 * torch.randn(4, 8)
    out = synthesize_negatives(anchor, positive, negative, torch.zeros(4, 8), hardness=1.0)
    assert torch.allclose((out - anchor).norm(dim=1), (positive - anchor).norm(dim=1), atol=1e-5)
    # ... along the original direction
    cosine = torch.cosine_similarity(out - anchor, negative - anchor, dim=1)
    assert torch.allclose(cosine, torch.ones(4), atol=1e-5)


def test_unit_weight_times_hardness_returns_the_negative():
    anchor, positive = torch.randn(3, 5), torch.randn(3, 5)
    negative = anchor + 10 * torch.randn(3, 5)
    out = synthesize_negatives(anchor, positive, negative, torch.full((3, 5), 0.5),
                               hardness=torch.full((3,), 2.0))
    assert torch.allclose(out, negative, atol=1e-5)


def test_hard_negatives_and_zero_distance_come_back_unchanged():
    anchor = torch.full((2, 3), 0.1, requires_grad=True)
    positive = torch.tensor([[2.1, 0.1, 0.1], [1.1, 0.1, 0.1]])
    negative = torch.tensor([[1.1, 0.3, 0.7], [0.1, 0.1, 0.1]])  # d+ > d-, and d- = 0
    weights = torch.full((2, 3), 0.3, requires_grad=True)
    out = synthesize_negatives(anchor, positive, negative, weights, hardness=1.0)
    assert torch.equal(out, negative)
    out.sum().backward()
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(weights.grad).all()


def balanced_batch(num_classes=4, per_class=3, dim=6):
    labels = torch.arange(num_classes).repeat_interleave(per_class) * 10 + 3  # any label values
    return torch.randn(labels.numel(), dim, dtype=torch.float64), labels


def test_batch_synthesis_shapes_and_labels():
    z, y = balanced_batch()
    fusion = torch.rand(12, 12, 6, dtype=torch.float64)
    synthetic, synthetic_labels, anchor_index = synthesize_batch(z, y, fusion, hardness=0.7)
    assert synthetic.shape == (12 * 3, 6)
    assert torch.equal(anchor_index, torch.arange(12).repeat_interleave(3))
    assert not (synthetic_labels == y[anchor_index]).any()
    for i in range(12):  # each anchor gets exactly the other classes, ascending
        others = sorted(set(y.tolist()) - {int(y[i])})
        assert synthetic_labels[anchor_index == i].tolist() == others


def test_batch_synthesis_by_hand_for_two_samples_per_class():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0], [4.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    fusion = torch.full((4, 4, 2), 0.5, dtype=torch.float64)
    mix = torch.tensor([0.25], dtype=torch.float64)
    synthetic, synthetic_labels, anchor_index = synthesize_batch(z, y, fusion, 1.0, mix=mix)
    # Anchor 0: positive 1 (d+ = 1); class 1 in canonical (sum) order: sample 2 then sample 3.
    n0 = synthesize_negatives(z[:1], z[1:2], z[2:3], fusion[0, 2:3], 1.0)
    n1 = synthesize_negatives(z[:1], z[1:2], z[3:4], fusion[0, 3:4], 1.0)
    expected = n1 + 0.25 * (n0 - n1)
    assert torch.allclose(synthetic[0], expected[0])
    assert synthetic_labels[0] == 1 and anchor_index[0] == 0


def test_shuffling_the_batch_permutes_but_does_not_change_the_synthetic_set():
    z, y = balanced_batch()
    fusion = torch.rand(12, 12, 6, dtype=torch.float64)
    fusion = (fusion + fusion.transpose(0, 1)) / 2
    mix = torch.rand(2, dtype=torch.float64)
    synthetic, labels, anchors = synthesize_batch(z, y, fusion, 0.8, mix=mix)
    perm = torch.randperm(12)
    synthetic_p, labels_p, anchors_p = synthesize_batch(
        z[perm], y[perm], fusion[perm][:, perm], 0.8, mix=mix)
    original = {(int(a), int(c)): s for a, c, s in zip(anchors, labels, synthetic)}
    for a, c, s in zip(anchors_p, labels_p, synthetic_p):
        assert torch.allclose(s, original[(int(perm[a]), int(c))], atol=1e-12)


@pytest.mark.parametrize("labels", [
    torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]),
    torch.tensor([0, 1, 2, 3]),
    torch.tensor([5, 5, 5]),
])
def test_unbalanced_batches_fail_clearly(labels):
    z = torch.randn(labels.numel(), 4)
    fusion = torch.rand(labels.numel(), labels.numel(), 4)
    with pytest.raises(ValueError, match="class-balanced.*class counts"):
        synthesize_batch(z, labels, fusion, 1.0)


def test_wrong_fusion_shape_and_mix_fail_clearly():
    z, y = balanced_batch()
    with pytest.raises(ValueError, match="dense"):
        synthesize_batch(z, y, torch.rand(144, 6), 1.0)
    with pytest.raises(ValueError, match="K - 1 = 2"):
        synthesize_batch(z, y, torch.rand(12, 12, 6), 1.0, mix=torch.rand(3))


def test_hardness_schedule_and_module():
    assert hardness_from_loss(5.0, 1e6) == pytest.approx(1.0, abs=1e-5)
    assert hardness_from_loss(5.0, 5.0) == pytest.approx(torch.e**-1)
    z, y = balanced_batch()
    generator = HardNegativeGenerator(alpha=5.0)
    assert "alpha=5.0" in repr(generator)
    fusion = torch.rand(12, 12, 6, dtype=torch.float64)
    torch.manual_seed(1)
    out = generator(z, y, fusion, mean_metric_loss=5.0)
    torch.manual_seed(1)
    expected = synthesize_batch(z, y, fusion, torch.e**-1)
    assert torch.allclose(out[0], expected[0])
