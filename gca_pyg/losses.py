"""The losses of GCA-HNG (SPEC.md §5).

Metric losses: the N-pair loss on real embeddings (:func:`npair_loss`, :math:`J_m`) and on synthetic
negatives (:func:`synthetic_npair_loss`, :math:`J_{syn}`). Generator losses: synthetic negatives must
still read as their class (:func:`synthetic_class_loss`, :math:`J_{ce}`), be close to their anchor
(:func:`similarity_loss`, :math:`J_{sim}`), and come from diverse fusion weights
(:func:`diversity_loss`, :math:`J_{div}`). Pairings come from the labels
(:func:`~gca_pyg.layout.class_layout`), never from positions in the batch.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.layout import class_layout
from gca_pyg.utils import gather_rows

__all__ = ["npair_loss", "synthetic_npair_loss", "synthetic_class_loss", "similarity_loss",
           "diversity_loss"]


def _l2_term(l2_reg: float, *rows: Tensor) -> Tensor:
    """0.25 · l2_reg · Σ over the given row sets of their mean squared norm."""
    return 0.25 * l2_reg * sum(r.square().sum(dim=-1).mean() for r in rows)


def npair_loss(embeddings: Tensor, labels: Tensor, l2_reg: float = 3e-3) -> Tensor:
    r"""The multi-class N-pair loss :math:`J_m` on a class-balanced batch.

    The first sample of each class is its anchor; for every other sample index :math:`k`, the
    :math:`C` anchors are classified against the :math:`C` samples :math:`k`
    (:math:`\mathrm{logits} = A P_k^\top`, target: the anchor's own class), averaged over :math:`k`;
    plus :math:`0.25 \cdot \mathrm{l2\_reg} \cdot \sum_k \mathrm{mean}_i \lVert \mathbf{z}\rVert^2`.

    Args:
        embeddings: :math:`(N, D)`, not normalised.
        labels: :math:`(N,)`, every class exactly :math:`K \ge 2` times.
        l2_reg: Weight of the embedding-norm penalty.
    """
    layout = class_layout(labels, embeddings)
    samples = gather_rows(embeddings, layout.members)  # (C, K, D)
    anchors, others = samples[:, 0], samples[:, 1:].transpose(0, 1)  # (C, D), (K-1, C, D)
    logits = torch.einsum("cd,kmd->kcm", anchors, others)
    target = torch.arange(layout.num_classes, device=labels.device).repeat(others.size(0))
    cross_entropy = F.cross_entropy(logits.reshape(-1, layout.num_classes), target)
    return cross_entropy + _l2_term(l2_reg, *samples.transpose(0, 1))


def _group_by_anchor(synthetic: Tensor, anchor_index: Tensor, num_anchors: int) -> Tensor:
    """Rows of `synthetic` as (num_anchors, M, D), M synthetic rows per anchor."""
    if synthetic.size(0) % num_anchors != 0:
        raise ValueError(f"{synthetic.size(0)} synthetic rows cannot be split evenly over "
                         f"{num_anchors} anchors")
    per_anchor = synthetic.size(0) // num_anchors
    order = torch.sort(anchor_index, stable=True).indices
    expected = torch.arange(num_anchors, device=anchor_index.device).repeat_interleave(per_anchor)
    if not torch.equal(anchor_index[order], expected):
        raise ValueError("every anchor must have the same number of synthetic negatives")
    return gather_rows(synthetic, order).view(num_anchors, per_anchor, -1)


def synthetic_npair_loss(embeddings: Tensor, labels: Tensor, synthetic: Tensor,
                         synthetic_labels: Tensor, anchor_index: Tensor,
                         l2_reg: float = 3e-3) -> Tensor:
    r"""The N-pair loss with synthetic negatives, :math:`J_{syn}`.

    Every sample is an anchor once; its logits are :math:`[\mathbf{a}^\top \mathbf{p},\;
    \mathbf{a}^\top \tilde{\mathbf{n}}_c \text{ for every other class } c]` with the positive as
    target; mean over anchors, plus the L2 term of :func:`npair_loss` on the anchors and on all
    candidates (positives and synthetic negatives).

    Args:
        embeddings, labels: The real batch, :math:`(N, D)` and :math:`(N,)`.
        synthetic, synthetic_labels, anchor_index: As returned by
            :func:`~gca_pyg.generator.synthesize_batch`.
        l2_reg: Weight of the embedding-norm penalty.
    """
    layout = class_layout(labels, embeddings)
    grouped = _group_by_anchor(synthetic, anchor_index, embeddings.size(0))
    grouped_labels = _group_by_anchor(synthetic_labels.unsqueeze(-1), anchor_index,
                                      embeddings.size(0)).squeeze(-1)
    if bool((grouped_labels == labels.unsqueeze(-1)).any()):
        raise ValueError("a synthetic negative has the label of its own anchor")
    positives = gather_rows(embeddings, layout.positive_index())
    candidates = torch.cat([positives.unsqueeze(1), grouped], dim=1)  # (N, C, D)
    logits = torch.einsum("nd,ncd->nc", embeddings, candidates)
    target = torch.zeros(embeddings.size(0), dtype=torch.long, device=embeddings.device)
    return F.cross_entropy(logits, target) + _l2_term(l2_reg, embeddings, candidates)


def synthetic_class_loss(synthetic: Tensor, synthetic_labels: Tensor,
                         classifier: Callable[[Tensor], Tensor], scale: float = 20.0) -> Tensor:
    r""":math:`J_{ce} = s \cdot \mathrm{CE}(W_s \tilde{\mathbf{n}}_{i,c}, c)`: a synthetic negative
    must still be classified as the class it stands for."""
    return scale * F.cross_entropy(classifier(synthetic), synthetic_labels)


def similarity_loss(embeddings: Tensor, synthetic: Tensor, anchor_index: Tensor,
                    num_classes: int) -> Tensor:
    r""":math:`J_{sim}`: mean of :math:`1 - \cos(\mathbf{a}, \tilde{\mathbf{n}})` over all
    :math:`N \cdot C` (anchor, class) pairs, the :math:`N` same-class pairs counting as 0 (the
    reference's intent; it zeroes other entries by mistake).

    Args:
        embeddings: The anchors' batch :math:`(N, D)`.
        synthetic, anchor_index: As returned by :func:`~gca_pyg.generator.synthesize_batch`.
        num_classes: :math:`C`, classes in the batch.
    """
    cosine = F.cosine_similarity(gather_rows(embeddings, anchor_index), synthetic, dim=-1)
    return (1.0 - cosine).sum() / (embeddings.size(0) * num_classes)


def diversity_loss(fusion_weights: Tensor, scale: float = 0.01, eps: float = 1e-12) -> Tensor:
    r""":math:`J_{div} = s \big(1 - \sqrt{\textstyle\sum_{ij} \lVert \boldsymbol{\lambda}_{ij} -
    \mathrm{mean}_{j'} \boldsymbol{\lambda}_{ij'} \rVert^2 / E}\big)`: rewards fusion weights that
    vary over each anchor's edges.

    Args:
        fusion_weights: Dense :math:`(N, N, D)` weights of the complete graph (:math:`E = N^2`).
        scale: :math:`s`.
        eps: Floor under the square root, so its gradient stays finite.
    """
    spread = fusion_weights - fusion_weights.mean(dim=1, keepdim=True)
    num_edges = fusion_weights.size(0) * fusion_weights.size(1)
    return scale * (1.0 - (spread.square().sum() / num_edges).clamp_min(eps).sqrt())
