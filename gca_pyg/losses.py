"""The losses of GCA-HNG (docs/method.md, "Losses").

Metric losses: the N-pair loss on real embeddings (:func:`npair_loss`, :math:`J_m`) and on synthetic
negatives (:func:`synthetic_npair_loss`, :math:`J_{syn}`). Generator losses: synthetic samples must
still read as their class (:func:`synthetic_class_loss`, :math:`J_{ce}`), negatives must be close to
their anchor (:func:`similarity_loss`, :math:`J_{sim}`), and fusion weights must be diverse
(:func:`diversity_loss`, :math:`J_{div}`). Pairings come from the labels
(:func:`~gca_pyg.layout.class_layout`), never from where a class sits in the batch.

The losses over synthetic samples and fusion weights also take one process's share of them
(``group``): each process passes the rows it computed, sums are combined over the processes with
:func:`gca_pyg.distributed.all_reduce_sum`, and every process returns the loss of the whole batch.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.distributed import all_reduce_sum
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.utils import gather_rows

__all__ = [
    "npair_loss",
    "synthetic_npair_loss",
    "synthetic_class_loss",
    "similarity_loss",
    "diversity_loss",
]


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
    embeddings: Tensor,
    labels: Tensor,
    synthetic: Tensor,
    synthetic_labels: Tensor,
    anchor_index: Tensor,
    l2_reg: float = 3e-3,
    *,
    layout: Optional[ClassLayout] = None,
    connected: Optional[Tensor] = None,
    group=None,
) -> Tensor:
    r"""The N-pair loss with synthetic negatives, :math:`J_{syn}`.

    Every sample is an anchor once; its logits are :math:`[\mathbf{a}^\top \mathbf{p},\;
    \mathbf{a}^\top \tilde{\mathbf{n}}_c \text{ for every other class } c]` with the positive as
    target; mean over anchors, plus the L2 term of :func:`npair_loss` on the anchors and on all
    :math:`N C` candidates (positives and synthetic negatives).

    On a sparse batch graph (:obj:`connected`) anchor :math:`i` has synthetic negatives only for
    the classes :math:`\mathcal{C}_i` it is joined to; its logits are :math:`[\mathbf{a}^\top
    \mathbf{p},\; \mathbf{a}^\top \tilde{\mathbf{n}}_c \text{ for } c \in \mathcal{C}_i]` (the other
    classes are left out of the softmax) and the L2 term's mean runs over the
    :math:`N + \sum_i |\mathcal{C}_i|` candidates present. With every class present this is the
    loss above.

    Args:
        embeddings, labels: The real batch, :math:`(N, D)` and :math:`(N,)`.
        synthetic, synthetic_labels, anchor_index: Synthetic rows, the class each stands for and
            its anchor, as :func:`~gca_pyg.generator.synthesize_batch` returns them. Every (anchor,
            other class) must occur exactly once (over all processes); rows of the anchor's own
            class are ignored.
        l2_reg: Weight of the embedding-norm penalty.
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`, if already derived.
        connected: Bool :math:`(N, C)`, True where anchor :math:`i` has a synthetic negative of
            class :math:`c` (see :meth:`gca_pyg.graph.EdgeShard.connected`); every other class if
            omitted.
        group: The process group whose processes hold the other synthetic rows, or :obj:`None`.
    """
    layout = layout if layout is not None else class_layout(labels)
    num_nodes, num_classes = embeddings.size(0), layout.num_classes
    synthetic_class = torch.searchsorted(layout.classes, synthetic_labels)
    is_other = synthetic_class != layout.class_index[anchor_index]
    slot = anchor_index * num_classes + synthetic_class
    expected = layout.class_index.unsqueeze(1) != torch.arange(num_classes, device=labels.device)
    if connected is not None:
        expected = expected & connected
    if group is None:
        filled = torch.bincount(slot[is_other], minlength=num_nodes * num_classes)
        if not torch.equal(filled.view(num_nodes, num_classes) == 1, expected) or bool(
            (filled > 1).any()
        ):
            raise ValueError(
                "synthetic_npair_loss needs exactly one synthetic negative per "
                "(anchor, other class)" + ("" if connected is None else " that connected marks")
            )
    anchors = gather_rows(embeddings, anchor_index)
    values = torch.where(is_other, (anchors * synthetic).sum(dim=-1), 0.0)
    logits = torch.zeros(num_nodes * num_classes, dtype=values.dtype, device=values.device)
    logits = all_reduce_sum(logits.index_add(0, slot, values), group).view(num_nodes, num_classes)
    positives = gather_rows(embeddings, layout.positive_index())
    own = layout.class_index.unsqueeze(1)
    logits = logits.scatter(1, own, (embeddings * positives).sum(dim=-1, keepdim=True))
    num_candidates = num_nodes * num_classes
    if connected is not None:
        logits = logits.masked_fill(~expected.scatter(1, own, True), float("-inf"))
        num_candidates = num_nodes + int(expected.sum())
    synthetic_norms = all_reduce_sum(
        torch.where(is_other, synthetic.square().sum(dim=-1), 0.0).sum(), group
    )
    candidate_norms = (positives.square().sum() + synthetic_norms) / num_candidates
    return F.cross_entropy(logits, layout.class_index) + 0.25 * l2_reg * (
        embeddings.square().sum(dim=-1).mean() + candidate_norms
    )


def _global_mean(values: Tensor, group) -> Tensor:
    """The mean of `values` over every process's rows."""
    count = torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)
    return all_reduce_sum(values.sum(), group) / all_reduce_sum(count, group)


def synthetic_class_loss(
    synthetic: Tensor,
    synthetic_labels: Tensor,
    classifier: Callable[[Tensor], Tensor],
    scale: float = 20.0,
    *,
    group=None,
) -> Tensor:
    r""":math:`J_{ce} = s \cdot \mathrm{CE}(W_s \tilde{\mathbf{n}}, c)`: a synthetic sample must
    still be classified as the class it stands for (mean over the rows of all processes)."""
    losses = F.cross_entropy(classifier(synthetic), synthetic_labels, reduction="none")
    return scale * _global_mean(losses, group)


def similarity_loss(
    embeddings: Tensor,
    synthetic: Tensor,
    anchor_index: Tensor,
    num_classes: int,
    *,
    mask: Optional[Tensor] = None,
    num_groups: Optional[int] = None,
    group=None,
) -> Tensor:
    r""":math:`J_{sim}`: mean of :math:`1 - \cos(\mathbf{a}, \tilde{\mathbf{n}})` over all
    :math:`N \cdot C` (anchor, class) pairs, the :math:`N` same-class pairs counting as 0 (the
    reference's intent; its mask zeroes other entries by mistake).

    On a sparse batch graph the sum runs over the (anchor, other class) groups present and is
    divided by the number of groups present, same-class ones included (:obj:`num_groups`), which
    is :math:`N \cdot C` on the complete graph.

    Args:
        embeddings: The anchors' batch :math:`(N, D)`.
        synthetic, anchor_index: Synthetic negatives and their anchors, as returned by
            :func:`~gca_pyg.generator.synthesize_batch`.
        num_classes: :math:`C`, classes in the batch.
        mask: Bool :math:`(|\text{rows}|,)`, the rows to count (e.g. not the own-class rows);
            all if omitted.
        num_groups: The denominator; :math:`N \cdot C` if omitted.
        group: The process group whose processes hold the other rows, or :obj:`None`.
    """
    distance = 1.0 - F.cosine_similarity(gather_rows(embeddings, anchor_index), synthetic, dim=-1)
    if mask is not None:
        distance = torch.where(mask, distance, 0.0)
    if num_groups is None:
        num_groups = embeddings.size(0) * num_classes
    return all_reduce_sum(distance.sum(), group) / num_groups


def diversity_loss(
    fusion_weights: Tensor,
    scale: float = 0.01,
    eps: float = 1e-12,
    *,
    edge_index: Optional[Tensor] = None,
    num_nodes: Optional[int] = None,
    group=None,
) -> Tensor:
    r""":math:`J_{div} = s \big(1 - \sqrt{\textstyle\sum_{ij} \lVert \boldsymbol{\lambda}_{ij} -
    \mathrm{mean}_{j'} \boldsymbol{\lambda}_{ij'} \rVert^2 / N^2}\big)` over the complete graph:
    rewards fusion weights that vary over each anchor's edges.

    Over the pairs of a sparse graph (:obj:`edge_index`), :math:`j` and :math:`j'` run over the
    stored neighbours :math:`\mathcal{N}(i)` of :math:`i` (itself included), so the row mean is
    over :math:`|\mathcal{N}(i)|` weights and :math:`N^2` becomes the number of stored directed
    pairs :math:`\sum_i |\mathcal{N}(i)|`; on the complete graph both are the terms above.

    Args:
        fusion_weights: Dense :math:`(N, N, D)` weights, or the weights of undirected pairs
            :math:`(E, D)` given with :obj:`edge_index` (each pair stands for both directions).
        scale: :math:`s`.
        eps: Floor under the square root, so its gradient stays finite.
        edge_index: The pairs :math:`(2, E)` of per-pair weights.
        num_nodes: :math:`N`, with :obj:`edge_index`.
        group: The process group whose processes hold the other pairs, or :obj:`None`.
    """
    if edge_index is None:
        spread = fusion_weights - fusion_weights.mean(dim=1, keepdim=True)
        num_nodes = fusion_weights.size(0)
        total = spread.square().sum()
        num_pairs = num_nodes * num_nodes
    else:
        if num_nodes is None:
            raise ValueError("diversity_loss needs num_nodes with per-pair fusion weights")
        source, target = edge_index
        mirrored = source != target
        loops = (~mirrored).nonzero().view(-1)  # a self-loop stands once: take it back once
        sums = torch.zeros(
            num_nodes,
            fusion_weights.size(1),
            dtype=fusion_weights.dtype,
            device=fusion_weights.device,
        )
        sums = sums.index_add(0, source, fusion_weights).index_add(0, target, fusion_weights)
        sums = sums.index_add(0, source[loops], gather_rows(fusion_weights, loops), alpha=-1)
        degree = torch.bincount(source, minlength=num_nodes) + torch.bincount(
            target[mirrored], minlength=num_nodes
        )
        degree = all_reduce_sum(degree, group)  # stored directed pairs from each node
        mean = all_reduce_sum(sums, group) / degree.unsqueeze(1)
        from_source = (fusion_weights - gather_rows(mean, source)).square().sum(dim=-1)
        from_target = (fusion_weights - gather_rows(mean, target)).square().sum(dim=-1)
        total = all_reduce_sum((from_source + torch.where(mirrored, from_target, 0.0)).sum(), group)
        num_pairs = int(degree.sum())
    return scale * (1.0 - (total / num_pairs).clamp_min(eps).sqrt())
