"""The metric-loss protocol: the registry of ``loss.metric``, ``loss.metric_kwargs``, and any
pytorch-metric-learning loss as J_m and J_syn."""

import sys

import pytest
import torch

from gca_pyg.errors import ConfigError
from gca_pyg.graph import BatchGraph
from gca_pyg.losses import (
    METRIC_LOSSES,
    MetricLoss,
    NPairLoss,
    PMLMetricLoss,
    ProxyAnchorLoss,
    build_metric_loss,
    npair_loss,
    register_metric_loss,
    synthetic_references,
)
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LossConfig, NetConfig, OptimConfig
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.trainer import AlternatingTrainer

from tiny_model import TinyBackbone, batch

losses = pytest.importorskip("pytorch_metric_learning.losses")


def build(metric, **kwargs):
    return build_metric_loss(LossConfig(metric=metric, **kwargs), num_classes=6, embedding_size=8)


def test_the_built_in_losses_come_by_name_and_take_their_keys_or_metric_kwargs():
    npair = build("npair", l2_reg=0.5)
    assert type(npair) is NPairLoss and npair.l2_reg == 0.5
    assert build("npair", metric_kwargs={"l2_reg": 0.25}).l2_reg == 0.25
    proxy = build("proxy_anchor", proxy_margin=0.2, metric_kwargs={"alpha": 16.0})
    assert type(proxy) is ProxyAnchorLoss and (proxy.margin, proxy.alpha) == (0.2, 16.0)
    assert proxy.proxies.shape == (6, 8) and proxy.class_centres is proxy.proxies
    assert npair.class_centres is None


@pytest.mark.parametrize(
    "metric, kwargs, message",
    [
        (
            "triplet",
            {},
            r"^'loss.metric' is 'triplet'; valid values: npair, proxy_anchor, .*pml:<LossName>",
        ),
        ("npair", {"margin": 1}, r"^'loss.metric_kwargs' has 'margin', which npair does not take"),
        ("pml:Triplet", {}, r"^'loss.metric' is pml:Triplet, but .* has no loss 'Triplet'; e\.g\."),
        ("pml:BaseMetricLossFunction", {}, r"has no loss 'BaseMetricLossFunction'"),
        (
            "pml:ContrastiveLoss",
            {"margin": 1},
            r"do not fit pml:ContrastiveLoss: .*unexpected keyword argument 'margin'",
        ),
        ("pml:ProxyNCALoss", {"num_classes": "many"}, r"^'loss.metric_kwargs' .* do not fit"),
        ("pml:MultiSimilarityLoss", {"alpha": "x"}, r"alpha: 'x' for pml:Multi.*is a number"),
        ("proxy_anchor", {"synthetic_proxies": 3}, r"synthetic_proxies: 3 .* is a str"),
    ],
)
def test_a_bad_metric_loss_is_one_line(metric, kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        build(metric, metric_kwargs=kwargs)
    assert "\n" not in str(error.value)


def test_a_pml_loss_without_the_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.losses", None)  # not installed
    with pytest.raises(ConfigError, match=r'needs pytorch-metric-learning: pip install "gca-pyg'):
        build("pml:MultiSimilarityLoss")


def test_a_new_loss_is_one_class_and_one_registered_name():
    @register_metric_loss("test_mean_distance")
    class MeanDistance(MetricLoss):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, embeddings, labels, *, layout=None):
            return self.scale * torch.cdist(embeddings, embeddings).mean()

        def synthetic_loss(self, embeddings, negatives, graph):
            anchors = embeddings[negatives.anchor]
            return -(anchors - negatives.embeddings).norm(dim=-1).mean()

    try:
        with pytest.raises(ValueError, match="taken"):
            register_metric_loss("npair")(MeanDistance)
        torch.manual_seed(0)
        model = GCAHNG(
            TinyBackbone(),
            6,
            16,
            net=NetConfig(num_layers=1, heads=2),
            loss=LossConfig(metric="test_mean_distance", metric_kwargs={"scale": 2.0}),
        )
        assert type(model.criterion) is MeanDistance and model.criterion.scale == 2.0
        model.generator.mean_generator_loss = 1.0  # a synthetic weight well above 0
        trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=2))
        losses_of_step = trainer.training_step(*batch())
        assert {"J_m", "J_syn", "J_gce"} <= set(losses_of_step)
    finally:
        del METRIC_LOSSES["test_mean_distance"]


def graph_and_negatives(dim=6):
    """A batch of 3 classes x 2, and one synthetic negative per (anchor, class) group, own
    class included (which J_syn must ignore)."""
    torch.manual_seed(3)
    labels = torch.tensor([5, 2, 5, 0, 2, 0])
    graph = BatchGraph.build(labels)
    embeddings = torch.randn(6, dim, dtype=torch.float64, requires_grad=True)
    anchor = torch.arange(6).repeat_interleave(3)
    class_index = torch.arange(3).repeat(6)
    rows = 0.7 * embeddings[anchor] + 0.3 * torch.randn(18, dim, dtype=torch.float64)
    negatives = SyntheticSamples(embeddings=rows, anchor=anchor, class_index=class_index)
    return embeddings, graph, negatives


def test_references_pair_each_synthetic_negative_with_its_own_anchor_only():
    embeddings, graph, negatives = graph_and_negatives()
    labels = graph.labels
    (a1, p, a2, n), ref_emb, ref_labels = synthetic_references(
        embeddings, negatives, graph.layout, graph.classes
    )
    # by hand: the real classmates, then every other-class row in (anchor, class) order
    positives = [(i, j) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]]
    assert sorted(zip(a1.tolist(), p.tolist())) == positives
    others = [r for r in range(18) if graph.classes[negatives.class_index[r]] != labels[r // 3]]
    assert a2.tolist() == [r // 3 for r in others]
    assert torch.equal(ref_emb[6 + n - 6], torch.cat([embeddings, negatives.embeddings[others]])[n])
    assert torch.equal(ref_labels[n], graph.classes[negatives.class_index[others]])
    assert torch.equal(ref_emb[:6], embeddings) and torch.equal(ref_labels[:6], labels)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss"])
def test_a_pml_pair_loss_is_j_m_and_takes_the_negatives_as_references(name):
    embeddings, graph, negatives = graph_and_negatives()
    criterion = build(f"pml:{name}")
    assert isinstance(criterion, PMLMetricLoss) and criterion.takes_references
    reference = getattr(losses, name)()
    labels = graph.labels
    assert torch.equal(criterion(embeddings, labels), reference(embeddings, labels))
    j_syn = criterion.synthetic_loss(embeddings, negatives, graph)
    others = negatives.is_negative(graph.layout)
    # An oracle: every anchor with its classmates as positives and its own negatives alone.
    pairs = []
    for r in others.nonzero().view(-1).tolist():
        pairs.append((negatives.anchor[r].item(), r))
    ref_emb = torch.cat([embeddings, negatives.embeddings[[r for _, r in pairs]]])
    ref_labels = torch.cat([labels, graph.classes[negatives.class_index[[r for _, r in pairs]]]])
    a1, p = zip(*[(i, j) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]])
    indices = (
        torch.tensor(a1),
        torch.tensor(p),
        torch.tensor([a for a, _ in pairs]),
        6 + torch.arange(len(pairs)),
    )
    expected = reference(embeddings, labels, indices, ref_emb, ref_labels)
    assert j_syn.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    # Label matching (every reference of another class a negative, of its class a positive)
    # would give another value: the pairing is what is tested.
    if name != "TripletMarginLoss":  # (its default margin may zero both)
        matched = reference(embeddings, labels, None, ref_emb, ref_labels)
        assert matched.item() != pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(j_syn, embeddings)
    assert grad.abs().sum() > 0


def test_a_pml_proxy_loss_meets_the_negatives_as_samples_of_their_classes():
    embeddings, graph, negatives = graph_and_negatives()
    criterion = build("pml:ProxyNCALoss", metric_kwargs={"softmax_scale": 3})
    assert not criterion.takes_references
    assert criterion.loss.proxies.shape == (6, 8)  # num_classes and embedding_size passed on
    assert criterion.class_centres is criterion.loss.proxies
    embeddings = torch.randn(6, 8, requires_grad=True)
    rows = torch.randn(18, 8, requires_grad=True)
    negatives = SyntheticSamples(rows, negatives.anchor, negatives.class_index)
    keep = negatives.is_negative(graph.layout)
    expected = criterion.loss(rows[keep], graph.classes[negatives.class_index[keep]])
    assert torch.equal(criterion.synthetic_loss(embeddings, negatives, graph), expected)


def test_a_pml_loss_trains_in_the_alternating_step_with_its_proxies_at_their_rate():
    torch.manual_seed(0)
    model = GCAHNG(
        TinyBackbone(),
        6,
        16,
        net=NetConfig(num_layers=1, heads=2),
        loss=LossConfig(metric="pml:ProxyAnchorLoss"),
    )
    model.generator.mean_generator_loss = 1.0
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, metric_lr=1e-3, epochs=2))
    proxies = model.criterion.loss.proxies
    rates = {id(p): g["lr"] for g in trainer.metric_optimizer.param_groups for p in g["params"]}
    assert rates[id(proxies)] == pytest.approx(1e-3 * OptimConfig().proxy_lr_ratio)
    before = proxies.detach().clone()
    values = trainer.training_step(*batch())
    assert torch.isfinite(torch.tensor([float(v) for v in values.values()])).all()
    assert "J_syn" in values and not torch.equal(before, proxies.detach())


def test_npair_through_the_protocol_is_the_loss_it_was():
    embeddings, graph, _ = graph_and_negatives()
    assert torch.equal(
        build("npair")(embeddings, graph.labels), npair_loss(embeddings, graph.labels)
    )
