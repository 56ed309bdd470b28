"""The losses of GCA-HNG (docs/method.md, "Losses").

Metric losses, each on real embeddings (:math:`J_m`) and with synthetic negatives
(:math:`J_{syn}`): the multi-class N-pair loss (:class:`NPairLoss`: :func:`npair_loss`,
:func:`synthetic_npair_loss`) and Proxy-Anchor (:class:`ProxyAnchorLoss`:
:func:`proxy_anchor_loss`, :func:`synthetic_proxy_anchor_loss`). Generator losses: synthetic
samples must still read as their class (:func:`synthetic_class_loss`, :math:`J_{ce}`), negatives
must be close to their anchor (:func:`similarity_loss`, :math:`J_{sim}`), and fusion weights must
be diverse (:func:`diversity_loss`, :math:`J_{div}`). Pairings come from the labels
(:func:`~gca_pyg.layout.class_layout`), never from where a class sits in the batch.

The losses over synthetic samples and fusion weights read the step's
:class:`~gca_pyg.graph.BatchGraph`: each process passes the rows it computed, sums are combined
over the graph's process group with :func:`gca_pyg.distributed.all_reduce_sum`, and every process
returns the loss of the whole batch.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.distributed import all_reduce_sum
from gca_pyg.graph import BatchGraph
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.utils import gather_rows

__all__ = [
    "METRIC_LOSSES",
    "NPairLoss",
    "ProxyAnchorLoss",
    "npair_loss",
    "synthetic_npair_loss",
    "proxy_anchor_loss",
    "synthetic_proxy_anchor_loss",
    "synthetic_class_loss",
    "similarity_loss",
    "diversity_loss",
]

#: The metric losses of ``loss.metric``.
METRIC_LOSSES = ("npair", "proxy_anchor")
#: The roles of a synthetic negative in Proxy-Anchor's :math:`J_{syn}`
#: (:func:`synthetic_proxy_anchor_loss`).
SYNTHETIC_PROXIES = ("anchor", "others", "relative", "proxy_positive", "class")


def _l2_term(l2_reg: float, *rows: Tensor) -> Tensor:
    """0.25 · l2_reg · Σ over the given row sets of their mean squared norm."""
    return 0.25 * l2_reg * sum(r.square().sum(dim=-1).mean() for r in rows)


def npair_loss(
    embeddings: Tensor,
    labels: Tensor,
    l2_reg: float = 3e-3,
    *,
    layout: Optional[ClassLayout] = None,
) -> Tensor:
    r"""The multi-class N-pair loss :math:`J_m` on a class-balanced batch.

    The first sample of each class (in batch order) is its anchor; for every other sample index
    :math:`k`, the :math:`C` anchors are classified against the :math:`C` samples :math:`k`
    (:math:`\mathrm{logits} = A P_k^\top`, target: the anchor's own class), averaged over
    :math:`k`; plus :math:`0.25 \cdot \mathrm{l2\_reg} \cdot \sum_k \mathrm{mean}_i
    \lVert \mathbf{z}\rVert^2`.

    Args:
        embeddings: :math:`(N, D)`, not normalised.
        labels: :math:`(N,)`, every class exactly :math:`K \ge 2` times.
        l2_reg: Weight of the embedding-norm penalty.
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`, if already derived.
    """
    layout = layout if layout is not None else class_layout(labels)
    samples = gather_rows(embeddings, layout.members)  # (C, K, D)
    anchors, others = samples[:, 0], samples[:, 1:].transpose(0, 1)  # (C, D), (K-1, C, D)
    logits = torch.einsum("cd,kmd->kcm", anchors, others)
    target = torch.arange(layout.num_classes, device=labels.device).repeat(others.size(0))
    cross_entropy = F.cross_entropy(logits.reshape(-1, layout.num_classes), target)
    return cross_entropy + _l2_term(l2_reg, *samples.transpose(0, 1))


def synthetic_npair_loss(
    embeddings: Tensor, synthetic: SyntheticSamples, graph: BatchGraph, l2_reg: float = 3e-3
) -> Tensor:
    r"""The N-pair loss with synthetic negatives, :math:`J_{syn}`.

    Every sample is an anchor once; its logits are :math:`[\mathbf{a}^\top \mathbf{p},\;
    \mathbf{a}^\top \tilde{\mathbf{n}}_c \text{ for every other class } c]` with the positive as
    target; mean over anchors, plus the L2 term of :func:`npair_loss` on the anchors and on all
    :math:`N C` candidates (positives and synthetic negatives).

    On a sparse batch graph anchor :math:`i` has synthetic negatives only for the classes
    :math:`\mathcal{C}_i` it is joined to (:attr:`BatchGraph.connected
    <gca_pyg.graph.BatchGraph.connected>`); its logits are :math:`[\mathbf{a}^\top \mathbf{p},\;
    \mathbf{a}^\top \tilde{\mathbf{n}}_c \text{ for } c \in \mathcal{C}_i]` (the other classes are
    left out of the softmax) and the L2 term's mean runs over the :math:`N + \sum_i
    |\mathcal{C}_i|` candidates present. With every class present this is the loss above.

    Args:
        embeddings: The real batch, :math:`(N, D)`.
        synthetic: This process's synthetic samples. Every (anchor, other class) of the graph must
            occur exactly once over all processes; rows of the anchor's own class are ignored.
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
        l2_reg: Weight of the embedding-norm penalty.
    """
    layout = graph.layout
    num_nodes, num_classes = embeddings.size(0), graph.num_classes
    is_other = synthetic.is_negative(layout)
    slot = synthetic.anchor * num_classes + synthetic.class_index
    expected = layout.class_index.unsqueeze(1) != torch.arange(
        num_classes, device=embeddings.device
    )
    connected = graph.connected
    if connected is not None:
        expected = expected & connected
    if graph.process_group is None:
        filled = torch.bincount(slot[is_other], minlength=num_nodes * num_classes)
        if not torch.equal(filled.view(num_nodes, num_classes) == 1, expected) or bool(
            (filled > 1).any()
        ):
            raise ValueError(
                "synthetic_npair_loss needs exactly one synthetic negative per "
                "(anchor, other class)"
                + ("" if connected is None else " that the sparse graph joins")
            )
    anchors = gather_rows(embeddings, synthetic.anchor)
    values = torch.where(is_other, (anchors * synthetic.embeddings).sum(dim=-1), 0.0)
    logits = torch.zeros(num_nodes * num_classes, dtype=values.dtype, device=values.device)
    logits = all_reduce_sum(logits.index_add(0, slot, values), graph.process_group)
    logits = logits.view(num_nodes, num_classes)
    positives = gather_rows(embeddings, layout.positive_index())
    own = layout.class_index.unsqueeze(1)
    logits = logits.scatter(1, own, (embeddings * positives).sum(dim=-1, keepdim=True))
    num_candidates = num_nodes * num_classes
    if connected is not None:
        logits = logits.masked_fill(~expected.scatter(1, own, True), float("-inf"))
        num_candidates = num_nodes + int(expected.sum())
    synthetic_norms = all_reduce_sum(
        torch.where(is_other, synthetic.embeddings.square().sum(dim=-1), 0.0).sum(),
        graph.process_group,
    )
    candidate_norms = (positives.square().sum() + synthetic_norms) / num_candidates
    return F.cross_entropy(logits, layout.class_index) + 0.25 * l2_reg * (
        embeddings.square().sum(dim=-1).mean() + candidate_norms
    )


def _log_one_plus_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    r""":math:`\log(1 + \sum_r e^{x_{rp}})` over the rows :math:`r` where `mask` holds, for every
    column :math:`p` (a log-sum-exp with a zero logit, so it is stable at any scale)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([logits, logits.new_zeros(1, logits.size(1))]), dim=0)


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Tensor:
    r"""The Proxy-Anchor loss (`Kim et al., "Proxy Anchor Loss for Deep Metric Learning"
    <https://arxiv.org/abs/2003.13911>`_, CVPR 2020): every proxy is an anchor, pulling the batch's
    samples of its class and pushing the others away,

    .. math::
        J = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+}
            e^{-\alpha (s(x, p) - \delta)}\Big)
          + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-}
            e^{\alpha (s(x, p) + \delta)}\Big),

    with :math:`s` the cosine similarity, :math:`\delta` the margin, :math:`\alpha` the scale,
    :math:`P` all proxies (one per training class), :math:`P^+` those with a sample in the batch and
    :math:`X_p^+`, :math:`X_p^-` the batch's samples of :math:`p`'s class and of the others.

    Args:
        embeddings: :math:`(N, D)`, not normalised.
        labels: :math:`(N,)`, training class ids in :math:`0 \dots |P| - 1`.
        proxies: :math:`(|P|, D)`, row :math:`c` the proxy of class :math:`c`.
        margin: :math:`\delta`. (default: :obj:`0.1`)
        alpha: :math:`\alpha`. (default: :obj:`32.0`)
    """
    cosine = F.linear(F.normalize(embeddings, dim=-1), F.normalize(proxies, dim=-1))
    positive = F.one_hot(labels, proxies.size(0)).bool()
    pull = _log_one_plus_sum_exp(-alpha * (cosine - margin), positive)
    push = _log_one_plus_sum_exp(alpha * (cosine + margin), ~positive)
    return pull.sum() / positive.any(dim=0).sum() + push.sum() / proxies.size(0)


def _log_one_plus(sums: Tensor, bound: float) -> Tensor:
    r""":math:`\log(1 + \sum_r e^{x_r})` from :math:`\sum_r e^{x_r - b}` (each :math:`x_r \le b`,
    so the sums cannot overflow at any scale)."""
    return torch.log(sums + math.exp(-bound)) + bound


def _mean_over_present(values: Tensor, counts: Tensor, process_group) -> Tensor:
    """The mean of `values` over the entries whose (all-reduced) `counts` are positive."""
    present = all_reduce_sum(counts, process_group) > 0
    return values[present].sum() / present.sum().clamp_min(1)


def synthetic_proxy_anchor_loss(
    synthetic: SyntheticSamples,
    graph: BatchGraph,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    *,
    negative_of: str = "anchor",
    embeddings: Optional[Tensor] = None,
) -> Tensor:
    r""":math:`J_{syn}` of the Proxy-Anchor track: the synthetic negatives in one of five roles.

    A synthetic negative :math:`\tilde{\mathbf{n}}_{i,c}` is built to lie near anchor :math:`i`
    (of class :math:`y_i`) while reading as another class :math:`c`. With :math:`s` the cosine
    similarity, :math:`\delta` the margin, :math:`\alpha` the scale, :math:`\mathbf{p}_c` the proxy
    of class :math:`c` and :math:`\operatorname{lse}^+(X) = \log(1 + \sum_{x \in X} e^x)`:

    * ``"anchor"``: a negative of its anchor's proxy, :math:`S_p = \{\tilde{\mathbf{n}}_{i,c} :
      y_i = p\}`, :math:`J_{syn} = \operatorname{mean}_{p \in P_s} \operatorname{lse}^+
      \{\alpha (s(\tilde{\mathbf{n}}, \mathbf{p}_p) + \delta) : \tilde{\mathbf{n}} \in S_p\}`.
    * ``"others"``: the same push, a negative of every proxy but its own class's,
      :math:`S_p = \{\tilde{\mathbf{n}}_{i,c} : c \ne p\}`.
    * ``"relative"``: the anchor's proxy must prefer the anchor to each of its synthetic
      negatives, as N-pair's :math:`J_{syn}` prefers the positive:
      :math:`J_{syn} = \operatorname{mean}_i \operatorname{lse}^+ \{\alpha
      (s(\tilde{\mathbf{n}}_{i,c}, \mathbf{p}_{y_i}) - s(\mathbf{a}_i, \mathbf{p}_{y_i}) + \delta)
      : c\}`. Moving the anchor and its negative together changes nothing; only what tells
      them apart is learned.
    * ``"proxy_positive"``: N-pair's :math:`J_{syn}` with the anchor's proxy as its positive:
      the anchor must be closer to its proxy than to each of its synthetic negatives,
      :math:`J_{syn} = \operatorname{mean}_i \operatorname{lse}^+ \{\alpha
      (s(\mathbf{a}_i, \tilde{\mathbf{n}}_{i,c}) - s(\mathbf{a}_i, \mathbf{p}_{y_i}) + \delta)
      : c\}`: a sample-to-sample push, which Proxy-Anchor's own terms lack.
    * ``"class"``: a sample of the class it stands for, in the Proxy-Anchor loss itself: the push
      of ``"others"`` plus the pull :math:`\operatorname{mean}_{c \in P_s^+} \operatorname{lse}^+
      \{-\alpha (s(\tilde{\mathbf{n}}_{i,c}, \mathbf{p}_c) - \delta) : i\}`.

    Means run over the proxies (anchors) with at least one term, :math:`P_s` (:math:`P_s^+`); rows
    of the anchor's own class are ignored; the sums run over the rows of all processes.

    Args:
        synthetic: This process's synthetic samples.
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
        proxies, margin, alpha: As in :func:`proxy_anchor_loss`.
        negative_of: ``"anchor"``, ``"others"``, ``"relative"``, ``"proxy_positive"`` or
            ``"class"``, see above. (default: :obj:`"anchor"`)
        embeddings: The real batch :math:`(N, D)`; needed by ``"relative"`` and
            ``"proxy_positive"``.
    """
    if negative_of not in SYNTHETIC_PROXIES:
        raise ValueError(
            f"negative_of must be one of {', '.join(SYNTHETIC_PROXIES)}, got {negative_of!r}"
        )
    if negative_of in ("relative", "proxy_positive") and embeddings is None:
        raise ValueError(
            f"synthetic_proxy_anchor_loss(negative_of={negative_of!r}) needs the embeddings of "
            "the batch"
        )
    group = graph.process_group
    num_proxies = proxies.size(0)
    is_negative = synthetic.is_negative(graph.layout)
    unit = F.normalize(synthetic.embeddings, dim=-1)
    unit_proxies = F.normalize(proxies, dim=-1)
    # Every exponent below is at most its bound (cosines lie in [-1, 1]): no overflow at any alpha.
    bound = alpha * (1.0 + margin)
    if negative_of in ("anchor", "relative", "proxy_positive"):
        proxy = graph.labels[synthetic.anchor]
        cosine = (  # the negative's cosine to the anchor's proxy, or (proxy_positive) to the anchor
            unit * gather_rows(unit_proxies, proxy)
            if negative_of != "proxy_positive"
            else unit * gather_rows(F.normalize(embeddings, dim=-1), synthetic.anchor)
        ).sum(dim=-1)
        if negative_of == "anchor":
            exponent = alpha * (cosine + margin)
            slots, num_slots = proxy, num_proxies
        else:
            unit_anchors = F.normalize(embeddings, dim=-1)
            anchor_cosine = F.linear(unit_anchors, unit_proxies)
            own = anchor_cosine.gather(1, graph.labels.unsqueeze(1)).squeeze(1)
            exponent = alpha * (cosine - gather_rows(own, synthetic.anchor) + margin)
            bound = alpha * (2.0 + margin)
            slots, num_slots = synthetic.anchor, embeddings.size(0)
        terms = torch.where(is_negative, torch.exp(exponent - bound), 0.0)
        sums = all_reduce_sum(unit.new_zeros(num_slots).index_add(0, slots, terms), group)
        counts = unit.new_zeros(num_slots).index_add(0, slots, is_negative.to(unit.dtype))
        return _mean_over_present(_log_one_plus(sums, bound), counts, group)
    cosine = F.linear(unit, unit_proxies)  # (G, |P|)
    own_class = F.one_hot(synthetic.labels(graph.classes), num_proxies).bool()
    negative = is_negative.unsqueeze(1) & ~own_class
    terms = torch.where(negative, torch.exp(alpha * (cosine + margin) - bound), 0.0)
    sums = all_reduce_sum(terms.sum(dim=0), group)
    push = _mean_over_present(_log_one_plus(sums, bound), negative.sum(dim=0).to(unit.dtype), group)
    if negative_of == "others":
        return push
    positive = is_negative.unsqueeze(1) & own_class
    pull_bound = alpha * (1.0 + margin)
    terms = torch.where(positive, torch.exp(-alpha * (cosine - margin) - pull_bound), 0.0)
    sums = all_reduce_sum(terms.sum(dim=0), group)
    counts = positive.sum(dim=0).to(unit.dtype)
    return push + _mean_over_present(_log_one_plus(sums, pull_bound), counts, group)


class NPairLoss(torch.nn.Module):
    r"""GCA-HNG's N-pair track: :math:`J_m` = :func:`npair_loss` on the real batch and
    :math:`J_{syn}` = :func:`synthetic_npair_loss` with synthetic negatives.

    Args:
        l2_reg (float, optional): Weight of the embedding-norm penalty. (default: :obj:`3e-3`)
    """

    def __init__(self, l2_reg: float = 3e-3):
        super().__init__()
        self.l2_reg = l2_reg

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, layout: Optional[ClassLayout] = None
    ) -> Tensor:
        """:math:`J_m` of a class-balanced batch."""
        return npair_loss(embeddings, labels, self.l2_reg, layout=layout)

    def synthetic(
        self, embeddings: Tensor, synthetic: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: the real batch against its synthetic negatives."""
        return synthetic_npair_loss(embeddings, synthetic, graph, self.l2_reg)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"


class ProxyAnchorLoss(torch.nn.Module):
    r"""The Proxy-Anchor track: :math:`J_m` = :func:`proxy_anchor_loss` on the real batch and
    :math:`J_{syn}` = :func:`synthetic_proxy_anchor_loss` over synthetic negatives. Holds the
    proxies, one per training class, initialised as in the paper (Kaiming normal, fan out); they
    are parameters, trained by the metric update (usually with a learning rate 100× the
    backbone's).

    Args:
        num_classes (int): Training classes, one proxy each.
        embedding_size (int): :math:`D`.
        margin (float, optional): :math:`\delta`. (default: :obj:`0.1`)
        alpha (float, optional): :math:`\alpha`. (default: :obj:`32.0`)
        synthetic_proxies (str, optional): ``negative_of`` of
            :func:`synthetic_proxy_anchor_loss`. (default: :obj:`"relative"`, the form that
            measured least harmful; gca_pyg 0.2.0 had only ``"anchor"``)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        synthetic_proxies: str = "relative",
    ):
        super().__init__()
        if synthetic_proxies not in SYNTHETIC_PROXIES:
            raise ValueError(
                f"synthetic_proxies must be one of {', '.join(SYNTHETIC_PROXIES)}, "
                f"got {synthetic_proxies!r}"
            )
        self.margin, self.alpha, self.synthetic_proxies = margin, alpha, synthetic_proxies
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, layout: Optional[ClassLayout] = None
    ) -> Tensor:
        """:math:`J_m` of a batch (`layout` is accepted for the signature :class:`NPairLoss`
        shares, and not needed)."""
        return proxy_anchor_loss(embeddings, labels, self.proxies, self.margin, self.alpha)

    def synthetic(
        self, embeddings: Tensor, synthetic: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: the synthetic negatives in the role ``synthetic_proxies``."""
        return synthetic_proxy_anchor_loss(
            synthetic,
            graph,
            self.proxies,
            self.margin,
            self.alpha,
            negative_of=self.synthetic_proxies,
            embeddings=embeddings,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.proxies.size(0)}, {self.proxies.size(1)}, margin={self.margin}, "
            f"alpha={self.alpha}, synthetic_proxies={self.synthetic_proxies!r}"
        )


def _global_mean(values: Tensor, process_group) -> Tensor:
    """The mean of `values` over every process's rows."""
    count = torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)
    return all_reduce_sum(values.sum(), process_group) / all_reduce_sum(count, process_group)


def synthetic_class_loss(
    synthetic: SyntheticSamples,
    graph: BatchGraph,
    classifier: Callable[[Tensor], Tensor],
    scale: float = 20.0,
) -> Tensor:
    r""":math:`J_{ce} = s \cdot \mathrm{CE}(W_s \tilde{\mathbf{n}}, c)`: a synthetic sample must
    still be classified as the class it stands for (mean over the rows of all processes)."""
    losses = F.cross_entropy(
        classifier(synthetic.embeddings), synthetic.labels(graph.classes), reduction="none"
    )
    return scale * _global_mean(losses, graph.process_group)


def similarity_loss(embeddings: Tensor, synthetic: SyntheticSamples, graph: BatchGraph) -> Tensor:
    r""":math:`J_{sim}`: mean of :math:`1 - \cos(\mathbf{a}, \tilde{\mathbf{n}})` over all
    :math:`N \cdot C` (anchor, class) pairs, the :math:`N` same-class pairs counting as 0 (the
    reference's intent; its mask zeroes other entries by mistake).

    On a sparse batch graph the sum runs over the (anchor, other class) groups present and is
    divided by the number of groups present, same-class ones included
    (:attr:`BatchGraph.total_groups <gca_pyg.graph.BatchGraph.total_groups>`), which is
    :math:`N \cdot C` on the complete graph.

    Args:
        embeddings: The anchors' batch :math:`(N, D)`.
        synthetic: This process's synthetic samples.
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
    """
    distance = 1.0 - F.cosine_similarity(
        gather_rows(embeddings, synthetic.anchor), synthetic.embeddings, dim=-1
    )
    distance = torch.where(synthetic.is_negative(graph.layout), distance, 0.0)
    return all_reduce_sum(distance.sum(), graph.process_group) / graph.total_groups


def diversity_loss(
    fusion_weights: Tensor, graph: BatchGraph, scale: float = 0.01, eps: float = 1e-12
) -> Tensor:
    r""":math:`J_{div} = s \big(1 - \sqrt{\textstyle\sum_{ij} \lVert \boldsymbol{\lambda}_{ij} -
    \mathrm{mean}_{j'} \boldsymbol{\lambda}_{ij'} \rVert^2 / N^2}\big)` over the complete graph:
    rewards fusion weights that vary over each anchor's edges.

    Over the pairs of a sparse graph, :math:`j` and :math:`j'` run over the stored neighbours
    :math:`\mathcal{N}(i)` of :math:`i` (itself included), so the row mean is over
    :math:`|\mathcal{N}(i)|` weights and :math:`N^2` becomes the number of stored directed pairs
    :math:`\sum_i |\mathcal{N}(i)|`; on the complete graph both are the terms above. Memory nodes
    (:attr:`BatchGraph.memory <gca_pyg.graph.BatchGraph.memory>`) are never anchors: :math:`i`
    runs over the batch, and :math:`\mathcal{N}(i)` includes the memory nodes joined to it.

    Args:
        fusion_weights: The weights of the graph's stored undirected pairs, :math:`(E, D)` (each
            pair stands for both directions).
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`; the sums run over the pairs of all
            its processes.
        scale: :math:`s`.
        eps: Floor under the square root, so its gradient stays finite.
    """
    process_group, num_anchors = graph.process_group, graph.num_nodes
    num_nodes = num_anchors + (0 if graph.memory is None else graph.memory.num_nodes)
    source, target = graph.shard.edge_index
    mirrored = source != target
    loops = (~mirrored).nonzero().view(-1)  # a self-loop stands once: take it back once
    sums = torch.zeros(
        num_nodes, fusion_weights.size(1), dtype=fusion_weights.dtype, device=fusion_weights.device
    )
    sums = sums.index_add(0, source, fusion_weights).index_add(0, target, fusion_weights)
    sums = sums.index_add(0, source[loops], gather_rows(fusion_weights, loops), alpha=-1)
    degree = torch.bincount(source, minlength=num_nodes) + torch.bincount(
        target[mirrored], minlength=num_nodes
    )
    degree = all_reduce_sum(degree, process_group)  # stored directed pairs from each node
    mean = all_reduce_sum(sums, process_group) / degree.unsqueeze(1)
    from_source = (fusion_weights - gather_rows(mean, source)).square().sum(dim=-1)
    from_target = (fusion_weights - gather_rows(mean, target)).square().sum(dim=-1)
    from_source = torch.where(source < num_anchors, from_source, 0.0)
    from_target = torch.where(mirrored & (target < num_anchors), from_target, 0.0)
    total = all_reduce_sum((from_source + from_target).sum(), process_group)
    num_pairs = int(degree[:num_anchors].sum())
    return scale * (1.0 - (total / num_pairs).clamp_min(eps).sqrt())
