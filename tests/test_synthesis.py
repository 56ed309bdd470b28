"""Channel-adaptive synthesis (gca_pyg.synthesis): one negative, a class's merge, by hand."""

import pytest
import torch

from gca_pyg.graph import BatchGraph
from gca_pyg.layout import class_layout
from gca_pyg.synthesis import draw_mix, hardness_from_loss, synthesize_groups, synthesize_negatives

from dense_synthesis import synthesize_dense


def synthesize_batch(z, y, fusion, hardness, mix=None, include_own_class=False):
    """(rows, the labels they stand for, their anchors) of :func:`synthesize_dense`."""
    out = synthesize_dense(z, y, fusion, hardness, mix, include_own_class)
    return out.embeddings, out.labels(class_layout(y).classes), out.anchor


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
    out = synthesize_negatives(
        anchor, positive, negative, torch.full((3, 5), 0.5), hardness=torch.full((3,), 2.0)
    )
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
    mix = torch.tensor([[0.25], [0.75]], dtype=torch.float64)  # one u per (anchor block, k)
    synthetic, synthetic_labels, anchor_index = synthesize_batch(z, y, fusion, 1.0, mix=mix)
    # Anchor 0 (first of its class: block 0), positive 1; class 1 in batch order: 2 then 3.
    n2 = synthesize_negatives(z[:1], z[1:2], z[2:3], fusion[0, 2:3], 1.0)
    n3 = synthesize_negatives(z[:1], z[1:2], z[3:4], fusion[0, 3:4], 1.0)
    assert torch.allclose(synthetic[0], (n3 + 0.25 * (n2 - n3))[0])
    assert synthetic_labels[0] == 1 and anchor_index[0] == 0
    # Anchor 1 (second of its class: block 1) takes its own coefficient, and sample 0 as positive.
    n2 = synthesize_negatives(z[1:2], z[:1], z[2:3], fusion[1, 2:3], 1.0)
    n3 = synthesize_negatives(z[1:2], z[:1], z[3:4], fusion[1, 3:4], 1.0)
    assert torch.allclose(synthetic[1], (n3 + 0.75 * (n2 - n3))[0])


def test_three_samples_per_class_roles_and_merge_order_by_hand():
    # Batch order, not values, sets the roles: class 5 is rows 0, 2, 4; class 8 is rows 1, 3, 5.
    y = torch.tensor([5, 8, 5, 8, 5, 8])
    layout = class_layout(y)
    assert layout.members.tolist() == [[0, 2, 4], [1, 3, 5]]
    assert layout.position.tolist() == [0, 0, 1, 1, 2, 2]
    assert layout.positive_index().tolist() == [2, 3, 4, 5, 0, 1]  # sample k -> sample k+1 mod 3
    z = torch.tensor(
        [[0.0, 1.0], [5.0, 5.0], [1.0, 0.0], [6.0, 4.0], [0.5, 0.5], [4.0, 7.0]],
        dtype=torch.float64,
    )
    fusion = torch.rand(6, 6, 2, dtype=torch.float64)
    mix = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    synthetic, labels, anchors = synthesize_batch(z, y, fusion, 0.9, mix=mix)
    # Anchor 2 is sample 1 of class 5 (block 1): positive row 4, negatives rows 1, 3, 5 in order.
    n1, n3, n5 = (synthesize_negatives(z[2], z[4], z[j], fusion[2, j], 0.9) for j in (1, 3, 5))
    merged = n3 + 0.3 * (n1 - n3)
    merged = n5 + 0.4 * (merged - n5)
    row = int(((anchors == 2) & (labels == 8)).nonzero())
    assert torch.allclose(synthetic[row], merged)


def test_own_class_rows_mix_the_classmates():
    z, y = balanced_batch()
    fusion = torch.rand(12, 12, 6, dtype=torch.float64)
    mix = draw_mix(3)
    others = synthesize_batch(z, y, fusion, 0.6, mix=mix)
    everything = synthesize_batch(z, y, fusion, 0.6, mix=mix, include_own_class=True)
    assert everything[0].shape == (12 * 4, 6)
    own = everything[1] == y[everything[2]]
    assert int(own.sum()) == 12
    assert torch.equal(everything[0][~own], others[0])
    # Anchor 0's own-class row: itself (d- = 0, unchanged), then its classmates 1 and 2.
    n = [synthesize_negatives(z[0], z[1], z[j], fusion[0, j], 0.6) for j in range(3)]
    assert torch.equal(n[0], z[0])
    merged = n[1] + mix[0, 0] * (n[0] - n[1])
    merged = n[2] + mix[0, 1] * (merged - n[2])
    assert torch.allclose(everything[0][own][0], merged)


def test_a_permutation_keeping_each_class_order_permutes_the_synthetic_set():
    z, y = balanced_batch()
    fusion = torch.rand(12, 12, 6, dtype=torch.float64)
    fusion = (fusion + fusion.transpose(0, 1)) / 2
    mix = torch.rand(3, 2, dtype=torch.float64)
    synthetic, labels, anchors = synthesize_batch(z, y, fusion, 0.8, mix=mix)
    original = {(int(a), int(c)): s for a, c, s in zip(anchors, labels, synthetic)}
    interleaved = torch.arange(12).view(4, 3).t().reshape(-1)  # classes interleaved, order kept
    synthetic_p, labels_p, anchors_p = synthesize_batch(
        z[interleaved], y[interleaved], fusion[interleaved][:, interleaved], 0.8, mix=mix
    )
    for a, c, s in zip(anchors_p, labels_p, synthetic_p):
        assert torch.allclose(s, original[(int(interleaved[a]), int(c))], atol=1e-12)
    # Reordering samples within a class changes their roles, hence the synthetic set.
    swapped = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    synthetic_s, labels_s, anchors_s = synthesize_batch(
        z[swapped], y[swapped], fusion[swapped][:, swapped], 0.8, mix=mix
    )
    assert not all(
        torch.allclose(s, original[(int(swapped[a]), int(c))])
        for a, c, s in zip(anchors_s, labels_s, synthetic_s)
    )


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]),
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([5, 5, 5]),
    ],
)
def test_unbalanced_batches_fail_clearly(labels):
    with pytest.raises(ValueError, match="class-balanced.*class counts"):
        BatchGraph.build(labels)


def test_wrong_mix_fails_clearly():
    z, y = balanced_batch()
    layout = class_layout(y)
    anchor, target_class = torch.arange(12), layout.class_index.flip(0)
    weights = torch.rand(12, 3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(K, K - 1\) = \(3, 2\)"):
        synthesize_groups(z, layout, anchor, target_class, weights, 1.0, torch.rand(2))


def test_hardness_schedule():
    assert hardness_from_loss(5.0, 1e6) == pytest.approx(1.0, abs=1e-5)
    assert hardness_from_loss(5.0, 5.0) == pytest.approx(torch.e**-1)


def test_mix_draws_come_from_the_given_generator():
    first = draw_mix(3, torch.Generator().manual_seed(4))
    assert first.shape == (3, 2) and bool(((first > 0) & (first < 1)).all())
    assert torch.equal(first, draw_mix(3, torch.Generator().manual_seed(4)))
