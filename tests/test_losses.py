"""The metric losses (N-pair, Proxy-Anchor) and the generator's losses, by hand and against
pytorch-metric-learning and the authors' code."""

import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from gca_pyg.graph import BatchGraph
from gca_pyg.losses import (
    ProxyAnchorLoss,
    diversity_loss,
    npair_loss,
    proxy_anchor_loss,
    similarity_loss,
    synthetic_class_loss,
    synthetic_npair_loss,
    synthetic_proxy_anchor_loss,
)
from gca_pyg.synthesis import SyntheticSamples

from dense_synthesis import synthesize_dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_softmax_at(logits, target):
    top = max(logits)
    return logits[target] - top - math.log(sum(math.exp(v - top) for v in logits))


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
    synthetic = synthesize_dense(z, y, torch.rand(6, 6, 4, dtype=torch.float64), 0.5)
    graph = BatchGraph.build(y)
    loss = synthetic_npair_loss(z, synthetic, graph)
    total, candidate_norms = 0.0, []
    for i in range(6):
        positive = z[i ^ 1]  # K = 2: the positive is the other sample of the class
        candidates = [positive] + [
            synthetic.embeddings[r] for r in range(12) if synthetic.anchor[r] == i
        ]
        total -= log_softmax_at([float(z[i] @ c) for c in candidates], 0)
        candidate_norms += [float(c.square().sum()) for c in candidates]
    l2 = z.square().sum(1).mean().item() + sum(candidate_norms) / len(candidate_norms)
    assert loss.item() == pytest.approx(total / 6 + 0.25 * 3e-3 * l2, rel=1e-9)
    # Rows may come in any order: the loss reads the anchor index.
    perm = torch.randperm(12)
    shuffled = SyntheticSamples(
        synthetic.embeddings[perm], synthetic.anchor[perm], synthetic.class_index[perm]
    )
    assert torch.allclose(synthetic_npair_loss(z, shuffled, graph), loss)


def test_synthetic_npair_loss_ignores_own_class_rows_and_needs_every_other_class_once():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    graph = BatchGraph.build(y)
    fusion = torch.rand(6, 6, 4, dtype=torch.float64)
    mix = torch.rand(2, 1, dtype=torch.float64)
    others = synthesize_dense(z, y, fusion, 0.5, mix=mix)
    everything = synthesize_dense(z, y, fusion, 0.5, mix=mix, include_own_class=True)
    assert torch.allclose(
        synthetic_npair_loss(z, everything, graph), synthetic_npair_loss(z, others, graph)
    )
    rows = SyntheticSamples(others.embeddings[1:], others.anchor[1:], others.class_index[1:])
    with pytest.raises(ValueError, match="exactly one synthetic negative"):
        synthetic_npair_loss(z, rows, graph)
    twice = torch.cat([torch.arange(12), torch.tensor([0])])
    rows = SyntheticSamples(
        others.embeddings[twice], others.anchor[twice], others.class_index[twice]
    )
    with pytest.raises(ValueError, match="exactly one synthetic negative"):
        synthetic_npair_loss(z, rows, graph)


def proxy_anchor_by_hand(z, y, proxies, margin, alpha):
    """The paper's formula, one proxy and one sample at a time, in Python floats."""
    unit = F.normalize(z.double(), dim=1)
    unit_proxies = F.normalize(proxies.double(), dim=1)
    pull, push, with_positives = 0.0, 0.0, 0
    for p in range(proxies.size(0)):
        positives = [float(unit[i] @ unit_proxies[p]) for i in range(len(y)) if y[i] == p]
        negatives = [float(unit[i] @ unit_proxies[p]) for i in range(len(y)) if y[i] != p]
        if positives:
            with_positives += 1
            pull += math.log(1 + sum(math.exp(-alpha * (s - margin)) for s in positives))
        push += math.log(1 + sum(math.exp(alpha * (s + margin)) for s in negatives))
    return pull / with_positives + push / proxies.size(0)


@pytest.mark.parametrize("margin, alpha", [(0.1, 32.0), (0.3, 8.0)])
def test_proxy_anchor_loss_is_the_papers_formula(margin, alpha):
    z = torch.randn(12, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 2, 2, 2, 3, 3, 3, 5, 5, 5])  # proxies 1 and 4 have no positives
    proxies = torch.randn(6, 6, dtype=torch.float64)
    expected = proxy_anchor_by_hand(z, y, proxies, margin, alpha)
    assert proxy_anchor_loss(z, y, proxies, margin, alpha).item() == pytest.approx(
        expected, rel=1e-10
    )


def test_the_proxy_anchor_module_uses_its_margin_scale_and_proxies():
    torch.manual_seed(2)
    z = torch.randn(12, 6, dtype=torch.float64)
    y = torch.arange(4).repeat_interleave(3)
    module = ProxyAnchorLoss(5, 6, margin=0.3, alpha=8.0).double()
    expected = proxy_anchor_by_hand(z, y, module.proxies.detach(), 0.3, 8.0)
    assert module(z, y).item() == pytest.approx(expected, rel=1e-10)
    graph = BatchGraph.build(y)
    synthetic = synthetic_for(y, [0, 3, 6], [1, 2, 3], dim=6)
    for negative_of in ("anchor", "others", "relative", "proxy_positive", "class"):
        module = ProxyAnchorLoss(5, 6, margin=0.3, alpha=8.0, synthetic_proxies=negative_of)
        module = module.double()
        expected = synthetic_proxy_anchor_loss(
            synthetic, graph, module.proxies, 0.3, 8.0, negative_of=negative_of, embeddings=z
        )
        assert torch.equal(module.synthetic_loss(z, synthetic, graph), expected)


def test_proxy_anchor_loss_equals_pytorch_metric_learning():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(3)
    z = torch.randn(24, 16, requires_grad=True)
    y = torch.arange(8).repeat_interleave(3) + 2
    ours = ProxyAnchorLoss(12, 16)
    theirs = losses.ProxyAnchorLoss(12, 16, margin=0.1, alpha=32)
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    expected, actual = theirs(z, y), ours(z, y)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(actual, [z, ours.proxies])
    expected_grads = torch.autograd.grad(expected, [z, theirs.proxies])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    # The same initialisation as PML's (and the paper's): Kaiming normal, fan out.
    assert ours.proxies.std().item() == pytest.approx(math.sqrt(2 / 12), rel=0.3)


def authors_proxy_anchor():
    """The authors' ``Proxy_Anchor`` (scripts/loss.py of a checkout in GCA_HNG_REFERENCE), with
    their CUDA calls redirected to the CPU; None without a checkout."""
    reference = os.environ.get("GCA_HNG_REFERENCE")
    if not reference or not os.path.isfile(os.path.join(reference, "scripts", "loss.py")):
        return None, None
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_reference
    finally:
        sys.path.pop(0)
    bench_reference.install_import_shims()
    sys.path.insert(0, reference)
    try:
        spec = importlib.util.spec_from_file_location(
            "reference_loss", os.path.join(reference, "scripts", "loss.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(reference)
    return module.Proxy_Anchor, bench_reference.RedirectCuda(torch.device("cpu"), reference)


def test_proxy_anchor_loss_equals_the_authors_code():
    proxy_anchor_class, redirect = authors_proxy_anchor()
    if proxy_anchor_class is None:
        pytest.skip(
            "set GCA_HNG_REFERENCE to a checkout of https://github.com/PWenJay/GCA-HNG to "
            "compare with their Proxy_Anchor (the paper's formula is checked above)"
        )
    torch.manual_seed(4)
    z = torch.randn(24, 16)
    y = torch.arange(8).repeat_interleave(3)
    proxies = torch.randn(10, 16)
    with redirect:
        expected = proxy_anchor_class(nb_classes=10, sz_embed=16, mrg=0.1, alpha=32)(z, y, proxies)
    assert proxy_anchor_loss(z, y, proxies).item() == pytest.approx(expected.item(), rel=1e-5)


def synthetic_for(y, anchor, class_index, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(anchor), dim, generator=generator, dtype=torch.float64)
    return SyntheticSamples(rows, torch.tensor(anchor), torch.tensor(class_index))


def lse_plus(exponents):
    """log(1 + sum of exp), written out."""
    return math.log(1 + sum(math.exp(x) for x in exponents))


@pytest.mark.parametrize("negative_of", ["anchor", "others", "relative", "proxy_positive", "class"])
def test_synthetic_proxy_anchor_loss_by_hand(negative_of):
    y = torch.tensor([4, 4, 1, 1, 6, 6])  # layout rows: class 1 -> 0, 4 -> 1, 6 -> 2
    graph = BatchGraph.build(y)
    # Anchors 0 and 1 (class 4) and 2 (class 1): a row per other class, one own-class row
    # (ignored); two anchors share a proxy, so per-anchor and per-proxy sums differ.
    synthetic = synthetic_for(y, [0, 0, 0, 2, 2, 1, 1], [0, 2, 1, 1, 2, 0, 2])
    embeddings = torch.randn(6, 5, dtype=torch.float64)
    proxies = torch.randn(8, 5, dtype=torch.float64)
    margin, alpha = 0.2, 10.0

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    stands_for = [1, 6, 4, 4, 6, 1, 6]
    anchor = [0, 0, 0, 2, 2, 1, 1]
    anchor_class = [4, 4, 4, 1, 1, 4, 4]
    rows = [r for r in range(7) if stands_for[r] != anchor_class[r]]
    pushed, pulled, per_anchor = {}, {}, {}  # proxy (anchor) -> its exponents
    for r in rows:
        n = synthetic.embeddings[r]
        if negative_of in ("relative", "proxy_positive"):
            a = embeddings[anchor[r]]
            p = proxies[anchor_class[r]]
            negative = cos(n, p) if negative_of == "relative" else cos(n, a)
            per_anchor.setdefault(anchor[r], []).append(alpha * (negative - cos(a, p) + margin))
            continue
        for p in [anchor_class[r]] if negative_of == "anchor" else range(8):
            if p != stands_for[r]:
                pushed.setdefault(p, []).append(alpha * (cos(n, proxies[p]) + margin))
        pulled.setdefault(stands_for[r], []).append(
            -alpha * (cos(n, proxies[stands_for[r]]) - margin)
        )
    if per_anchor:
        expected = sum(map(lse_plus, per_anchor.values())) / len(per_anchor)
    else:
        expected = sum(map(lse_plus, pushed.values())) / len(pushed)
        if negative_of == "class":
            expected += sum(map(lse_plus, pulled.values())) / len(pulled)
    actual = synthetic_proxy_anchor_loss(
        synthetic, graph, proxies, margin, alpha, negative_of=negative_of, embeddings=embeddings
    )
    assert actual.item() == pytest.approx(expected, rel=1e-10)


def test_the_relative_form_ignores_what_anchor_and_negative_share():
    """The relative J_syn reads only the difference of the two cosines: negatives on their
    anchor's ray give log(1 + (C - 1) e^{alpha margin}) whatever the anchors and proxies."""
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    graph = BatchGraph.build(y)
    embeddings = torch.randn(6, 4, dtype=torch.float64)
    anchor, class_index = [0, 0, 2, 2, 4, 4], [1, 2, 0, 2, 0, 1]
    rows = embeddings[anchor] * 3.0  # on the anchor's ray: the same cosine to every proxy
    synthetic = SyntheticSamples(rows, torch.tensor(anchor), torch.tensor(class_index))
    proxies = torch.randn(3, 4, dtype=torch.float64)
    loss = synthetic_proxy_anchor_loss(
        synthetic, graph, proxies, 0.1, 32.0, negative_of="relative", embeddings=embeddings
    )
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(3.2)), rel=1e-12)
    for negative_of in ("relative", "proxy_positive"):
        with pytest.raises(ValueError, match="needs the embeddings"):
            synthetic_proxy_anchor_loss(synthetic, graph, proxies, negative_of=negative_of)


def test_synthetic_proxy_anchor_loss_stays_finite_at_large_scales():
    y = torch.tensor([0, 0, 1, 1])
    graph = BatchGraph.build(y)
    synthetic = synthetic_for(y, [0, 2], [1, 0])
    proxies = synthetic.embeddings.clone().float()  # each on its anchor's class proxy
    rows = SyntheticSamples(synthetic.embeddings.float(), synthetic.anchor, synthetic.class_index)
    loss = synthetic_proxy_anchor_loss(rows, graph, proxies, 0.1, alpha=500.0)
    # log(1 + e^{alpha (1 + margin)}) ~ 550 for each proxy; e^550 overflows a float.
    assert loss.item() == pytest.approx(550.0, rel=1e-4)


def test_synthetic_class_loss_by_hand():
    classifier = torch.nn.Linear(3, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    graph = BatchGraph.build(y)
    synthetic = SyntheticSamples(
        torch.randn(5, 3), torch.tensor([0, 2, 4, 6, 1]), torch.tensor([0, 3, 1, 1, 2])
    )
    logits = classifier(synthetic.embeddings)
    labels = [0, 3, 1, 1, 2]
    expected = -sum(log_softmax_at(logits[i].tolist(), labels[i]) for i in range(5)) / 5
    loss = synthetic_class_loss(synthetic, graph, classifier, scale=20.0)
    assert loss.item() == pytest.approx(20 * expected, rel=1e-5)


def test_similarity_loss_by_hand():
    y = torch.tensor([0, 1, 2, 0, 1, 2])  # N = 6, C = 3: 18 (anchor, class) pairs
    graph = BatchGraph.build(y)
    z = torch.zeros(6, 2)
    z[0], z[1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    synthetic = SyntheticSamples(
        torch.tensor([[1.0, 1.0], [0.0, -2.0], [3.0, 0.0], [5.0, 5.0]]),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([1, 2, 0, 1]),  # the last is anchor 1's own class: it counts 0
    )
    cosines = [1 / math.sqrt(2), 0.0, 0.0]
    expected = sum(1 - c for c in cosines) / 18
    assert similarity_loss(z, synthetic, graph).item() == pytest.approx(expected)


def diversity_by_hand(weights, pairs, num_nodes):
    """J_div from the directed neighbour lists of undirected pairs, in Python floats."""
    rows = {i: [] for i in range(num_nodes)}
    for r, (i, j) in enumerate(pairs.T.tolist()):
        rows[i].append(weights[r].double())
        if i != j:
            rows[j].append(weights[r].double())
    total = sum(
        float((w - torch.stack(ws).mean(0)).square().sum()) for ws in rows.values() for w in ws
    )
    return 0.01 * (1 - math.sqrt(total / sum(len(ws) for ws in rows.values())))


def test_diversity_loss_by_hand_on_the_complete_graph():
    y = torch.tensor([0, 0, 1, 1])
    graph = BatchGraph.build(y)
    pairs = graph.shard.edge_index
    weights = torch.rand(pairs.size(1), 3, dtype=torch.float64, requires_grad=True)
    expected = diversity_by_hand(weights.detach(), pairs, 4)
    assert diversity_loss(weights, graph).item() == pytest.approx(expected, rel=1e-12)
    flat = torch.full((pairs.size(1), 2), 0.5, requires_grad=True)
    diversity_loss(flat, graph).backward()
    assert torch.isfinite(flat.grad).all()
