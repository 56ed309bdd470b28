"""GCA-HNG's N-pair track: the multi-class N-pair loss on the batch (:math:`J_m`) and with
synthetic negatives (:math:`J_{syn}`)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.distributed import all_reduce_sum
from gca_pyg.graph import BatchGraph
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.losses.metric import MetricLoss, _construct, register_metric_loss
from gca_pyg.schema import LossConfig
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.utils import gather_rows

__all__ = ["NPairLoss", "npair_loss", "synthetic_npair_loss"]


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


@register_metric_loss("npair")
class NPairLoss(MetricLoss):
    r"""GCA-HNG's N-pair track: :math:`J_m` = :func:`npair_loss` on the real batch and
    :math:`J_{syn}` = :func:`synthetic_npair_loss` with synthetic negatives.

    Args:
        l2_reg (float, optional): Weight of the embedding-norm penalty. (default: :obj:`3e-3`)
    """

    def __init__(self, l2_reg: float = 3e-3):
        super().__init__()
        self.l2_reg = l2_reg

    @classmethod
    def from_config(cls, config: LossConfig, num_classes: int, embedding_size: int) -> "NPairLoss":
        """``loss.l2_reg``, unless ``loss.metric_kwargs`` sets it."""
        return _construct(cls, "npair", config.metric_kwargs, l2_reg=config.l2_reg)

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, layout: Optional[ClassLayout] = None
    ) -> Tensor:
        """:math:`J_m` of a class-balanced batch."""
        return npair_loss(embeddings, labels, self.l2_reg, layout=layout)

    def synthetic_loss(
        self, embeddings: Tensor, negatives: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: the real batch against its synthetic negatives."""
        return synthetic_npair_loss(embeddings, negatives, graph, self.l2_reg)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"
