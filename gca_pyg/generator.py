"""Channel-adaptive synthesis of hard negatives (SPEC.md §4).

:func:`synthesize_negatives` moves one negative towards its anchor, channel by channel;
:func:`synthesize_batch` does it for every (anchor, negative) pair of a class-balanced batch and
merges the K negatives of each other class into one synthetic negative per (anchor, class);
:class:`HardNegativeGenerator` adds the hardness schedule.
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from gca_pyg.layout import class_layout
from gca_pyg.utils import gather_rows

__all__ = ["synthesize_negatives", "synthesize_batch", "hardness_from_loss",
           "HardNegativeGenerator"]


def synthesize_negatives(anchor: Tensor, positive: Tensor, negative: Tensor, weights: Tensor,
                         hardness: Union[float, Tensor], eps: float = 1e-12) -> Tensor:
    r"""Moves each negative towards its anchor, each channel by its own learned ratio.

    With :math:`d^+ = \lVert \mathbf{a} - \mathbf{p} \rVert_2` and
    :math:`d^- = \lVert \mathbf{a} - \mathbf{n} \rVert_2`,

    .. math::
        \mathbf{r} = \frac{d^+ + (d^- - d^+)\,\boldsymbol{\lambda}\,h}{d^-}, \qquad
        \tilde{\mathbf{n}} = \mathbf{a} + (\mathbf{n} - \mathbf{a}) \odot \mathbf{r},

    so :math:`\boldsymbol{\lambda} h = 0` puts :math:`\tilde{\mathbf{n}}` at distance :math:`d^+` from
    the anchor and :math:`\boldsymbol{\lambda} h = 1` returns :math:`\mathbf{n}`. A negative that is
    already hard (:math:`d^+ \ge d^-`, which includes :math:`d^- = 0`) is returned unchanged.

    Args:
        anchor, positive, negative: Rows of shape :math:`(M, D)` (or shapes that broadcast).
        weights: Per-channel fusion weights :math:`\boldsymbol{\lambda} \in (0, 1)`, :math:`(M, D)`.
        hardness: :math:`h`, a float or a tensor of shape :math:`(M,)`.
        eps: Lower bound of :math:`d^-` in the division, so gradients stay finite at
            :math:`d^- = 0`.

    Returns:
        The synthetic negatives :math:`(M, D)`; differentiable in every input.
    """
    if isinstance(hardness, Tensor) and hardness.dim() == 1:
        hardness = hardness.unsqueeze(-1)
    d_pos = torch.linalg.vector_norm(anchor - positive, dim=-1, keepdim=True)
    offset = negative - anchor
    d_neg = torch.linalg.vector_norm(offset, dim=-1, keepdim=True)
    # r = d+/d- + (1 - d+/d-) h lambda: per-row scalars times the per-channel weights. The clamp
    # keeps the branch a hard negative does not use finite, so no NaN leaks into gradients at d- = 0.
    base = d_pos / d_neg.clamp_min(eps)
    moved = anchor + offset * (base + (1.0 - base) * hardness * weights)
    return torch.where(d_pos >= d_neg, negative, moved)


def synthesize_batch(embeddings: Tensor, labels: Tensor, fusion_weights: Tensor,
                     hardness: float, *, mix: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    r"""One synthetic hard negative per (anchor, other class) of a class-balanced batch.

    Every sample :math:`i` is an anchor; its positive is the next sample of its class (in the
    canonical order of :func:`~gca_pyg.layout.class_layout`). For each other class :math:`c` with
    samples :math:`n_0, \dots, n_{K-1}`, each :math:`n_k` is synthesised with the weights
    :math:`\boldsymbol{\lambda}_{i n_k}` (:func:`synthesize_negatives`) and the K results are merged in
    order,

    .. math::
        \tilde{\mathbf{n}}_c \leftarrow \tilde{\mathbf{n}}_k + u_k (\tilde{\mathbf{n}}_c -
        \tilde{\mathbf{n}}_k), \quad k = 1, \dots, K-1, \qquad u_k \sim U(0, 1),

    starting from :math:`\tilde{\mathbf{n}}_c = \tilde{\mathbf{n}}_0` (one :math:`u_k` per call,
    shared by the batch, as in the reference).

    Args:
        embeddings: :math:`(N, D)`.
        labels: :math:`(N,)`; every class exactly :math:`K \ge 2` times.
        fusion_weights: Dense :math:`(N, N, D)` weights, ``[i, j]`` for anchor :math:`i` and
            negative :math:`j` (see :func:`gca_pyg.graph.to_dense_edges`).
        hardness: :math:`h` (see :func:`hardness_from_loss`).
        mix: The :math:`K - 1` coefficients :math:`u_k`; drawn from :math:`U(0, 1)` if omitted.

    Returns:
        ``(synthetic, synthetic_labels, anchor_index)``: :math:`(N (C-1), D)` negatives, the class
        each stands for, and the batch index of its anchor; rows are grouped by anchor (batch order),
        then by class (ascending), so any loss taking ``(embeddings, labels)`` can consume them.

    Raises:
        ValueError: If the batch is not class-balanced, naming the class counts.
    """
    num_nodes = embeddings.size(0)
    if fusion_weights.shape != (num_nodes, num_nodes, embeddings.size(1)):
        raise ValueError(
            f"fusion_weights must be dense [N, N, D] = [{num_nodes}, {num_nodes}, "
            f"{embeddings.size(1)}], got {tuple(fusion_weights.shape)}; densify per-edge weights "
            "with gca_pyg.graph.to_dense_edges")
    layout = class_layout(labels, embeddings)
    samples_per_class = layout.samples_per_class
    if mix is None:
        mix = torch.rand(samples_per_class - 1, device=embeddings.device)
    elif mix.shape != (samples_per_class - 1,):
        raise ValueError(f"mix must hold K - 1 = {samples_per_class - 1} coefficients, "
                         f"got shape {tuple(mix.shape)}")

    other = layout.other_classes()  # (N, C-1)
    negative_index = layout.members[other]  # (N, C-1, K)
    anchor_index = torch.arange(num_nodes, device=embeddings.device)
    # Anchors and positives broadcast over (C-1, K); negatives and weights are (N, C-1, K, D).
    anchor = embeddings.view(num_nodes, 1, 1, -1)
    positive = gather_rows(embeddings, layout.positive_index()).view(num_nodes, 1, 1, -1)
    weights = gather_rows(fusion_weights.reshape(num_nodes * num_nodes, -1),
                          anchor_index.view(-1, 1, 1) * num_nodes + negative_index)
    negatives = synthesize_negatives(anchor, positive, gather_rows(embeddings, negative_index),
                                     weights, hardness)

    synthetic = negatives[:, :, 0]
    for k in range(1, samples_per_class):  # K is 2 or 3: a loop over samples of a class, not nodes
        synthetic = negatives[:, :, k] + mix[k - 1] * (synthetic - negatives[:, :, k])
    synthetic_labels = layout.classes[other]
    anchors = anchor_index.view(-1, 1).expand_as(other)
    return (synthetic.reshape(-1, embeddings.size(1)), synthetic_labels.reshape(-1),
            anchors.reshape(-1))


def hardness_from_loss(alpha: float, mean_metric_loss: float) -> float:
    r"""The hardness factor :math:`h = \exp(-\alpha / \bar{J}_m)` of :func:`synthesize_negatives`.

    While the metric loss is high, :math:`h \approx 1` and synthetic negatives stay near the real
    ones; as it falls, :math:`h \to 0` and they are pulled in towards the positive's distance."""
    return math.exp(-alpha / mean_metric_loss)


class HardNegativeGenerator(torch.nn.Module):
    r"""Batch-level hard-negative synthesis with the hardness schedule of GCA-HNG.

    Args:
        alpha (float): :math:`\alpha` of the hardness :math:`h = \exp(-\alpha / \bar{J}_m)`.
    """
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, embeddings: Tensor, labels: Tensor, fusion_weights: Tensor,
                mean_metric_loss: float) -> Tuple[Tensor, Tensor, Tensor]:
        """See :func:`synthesize_batch`; :obj:`mean_metric_loss` is :math:`\\bar{J}_m`."""
        hardness = hardness_from_loss(self.alpha, mean_metric_loss)
        return synthesize_batch(embeddings, labels, fusion_weights, hardness)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
