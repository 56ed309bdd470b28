"""Channel-adaptive synthesis of hard negatives (docs/method.md, "Synthesis of hard negatives"):
the pure functions that :class:`~gca_pyg.generator.HardNegativeGenerator` composes.

:func:`synthesize_negatives` moves one negative towards its anchor, channel by channel;
:func:`synthesize_groups` does it for (anchor, class) groups of a class-balanced batch and merges
the K samples of the class into one synthetic sample per group (:class:`SyntheticSamples`);
:func:`draw_mix` draws the merge coefficients; :func:`hardness_from_loss` is the hardness schedule.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.layout import ClassLayout
from gca_pyg.utils import gather_rows

__all__ = [
    "SyntheticSamples",
    "synthesize_negatives",
    "synthesize_groups",
    "draw_mix",
    "hardness_from_loss",
]


@dataclass(frozen=True)
class SyntheticSamples:
    """One synthetic sample per (anchor, class) group, as
    :meth:`~gca_pyg.generator.HardNegativeGenerator.synthesize` returns them.

    Attributes:
        embeddings: The synthetic samples, :math:`(G, D)`.
        anchor: The batch index of each one's anchor, :math:`(G,)`.
        class_index: The class each stands for, as a row of
            :attr:`ClassLayout.classes <gca_pyg.layout.ClassLayout>`, :math:`(G,)`.
    """

    embeddings: Tensor
    anchor: Tensor
    class_index: Tensor

    def labels(self, classes: Tensor) -> Tensor:
        """The label of the class each sample stands for, from the label of each class row
        (:attr:`BatchGraph.classes <gca_pyg.graph.BatchGraph.classes>`)."""
        return classes[self.class_index]

    def is_negative(self, layout: ClassLayout) -> Tensor:
        """Bool :math:`(G,)`: True where the sample stands for another class than its anchor's."""
        return self.class_index != layout.class_index[self.anchor]


def synthesize_negatives(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    weights: Tensor,
    hardness: Union[float, Tensor],
    eps: float = 1e-12,
) -> Tensor:
    r"""Moves each negative towards its anchor, each channel by its own learned ratio.

    With :math:`d^+ = \lVert \mathbf{a} - \mathbf{p} \rVert_2` and
    :math:`d^- = \lVert \mathbf{a} - \mathbf{n} \rVert_2`,

    .. math::
        \mathbf{r} = \frac{d^+ + (d^- - d^+)\,\boldsymbol{\lambda}\,h}{d^-}, \qquad
        \tilde{\mathbf{n}} = \mathbf{a} + (\mathbf{n} - \mathbf{a}) \odot \mathbf{r},

    so :math:`\boldsymbol{\lambda} h = 0` puts :math:`\tilde{\mathbf{n}}` at distance
    :math:`d^+` from the anchor and :math:`\boldsymbol{\lambda} h = 1` returns
    :math:`\mathbf{n}`. A negative that is already hard (:math:`d^+ \ge d^-`, which includes
    :math:`d^- = 0`) is returned unchanged.

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
    # keeps the branch a hard negative does not use finite: no NaN leaks into gradients at d- = 0.
    base = d_pos / d_neg.clamp_min(eps)
    moved = anchor + offset * (base + (1.0 - base) * hardness * weights)
    return torch.where(d_pos >= d_neg, negative, moved)


def synthesize_groups(
    embeddings: Tensor,
    layout: ClassLayout,
    anchor: Tensor,
    target_class: Tensor,
    weights: Tensor,
    hardness: Union[float, Tensor],
    mix: Tensor,
    mask: Optional[Tensor] = None,
    members: Optional[Tensor] = None,
    at_anchor_norm: Optional[Tensor] = None,
) -> Tensor:
    r"""One synthetic sample per (anchor, class) group, merging the class's :math:`K` samples.

    For anchor :math:`i` (its positive is the next sample of its class, see
    :func:`~gca_pyg.layout.class_layout`) and class :math:`c` with samples
    :math:`n_0, \dots, n_{K-1}` in batch order, each :math:`n_k` is moved by
    :func:`synthesize_negatives` with its own weights :math:`\boldsymbol{\lambda}_{i n_k}`, and the
    :math:`K` results are merged in order,

    .. math::
        \tilde{\mathbf{n}}_c \leftarrow \tilde{\mathbf{n}}_k + u_{r(i),k} (\tilde{\mathbf{n}}_c -
        \tilde{\mathbf{n}}_k), \quad k = 1, \dots, K-1,

    starting from :math:`\tilde{\mathbf{n}}_c = \tilde{\mathbf{n}}_0`, where :math:`r(i)` is the
    anchor's position in its class: one coefficient per (anchor block, k), as the reference draws
    them. A group whose class is the anchor's own mixes the anchor's classmates with the weights of
    the positive edges (the anchor itself comes back unchanged, :math:`d^- = 0`).

    On a sparse graph (:obj:`mask`) only the samples joined to the anchor are merged, in the same
    order and with the same coefficients: the first of them starts the merge and every further one,
    :math:`k`, applies the step above with :math:`u_{r(i),k}`. With every sample joined this is the
    merge above, bit for bit.

    Args:
        embeddings: :math:`(N, D)`.
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`.
        anchor: Anchor node of every group, :math:`(G,)`.
        target_class: Class row (in ``layout.classes``) of every group, :math:`(G,)`.
        weights: Fusion weights of the group's :math:`K` edges, :math:`(G, K, D)`; with
            :obj:`mask`, those of the joined samples only, :math:`(M, D)` for the :math:`M` True
            entries of the mask in row-major order (``weights[mask]`` of the full tensor).
        hardness: :math:`h` (see :func:`hardness_from_loss`).
        mix: Merge coefficients :math:`u`, :math:`(K, K - 1)` (see :func:`draw_mix`).
        mask: Bool :math:`(G, K)`, True for the samples joined to the anchor (at least one per
            group); all if omitted. Only the joined samples are moved, so memory grows with
            :math:`M`, not :math:`G K`.
        members: The node (row of `embeddings`) of each group's :math:`K` slots, :math:`(G, K)`,
            where a group's class is not the batch's (memory nodes, see
            :class:`~gca_pyg.graph.EdgeShard`); the class's samples in batch order,
            ``layout.members[target_class]``, if omitted.
        at_anchor_norm: Bool :math:`(G, K)`, with `mask` only: True for the members whose
            direction alone counts, put at their anchor's norm,
            :math:`\hat{\mathbf{n}} \lVert\mathbf{a}\rVert`, before they are moved (memory
            nodes: a stored norm is stale, and a fixed one would let the metric loss fall by
            growing every embedding). With gradient through :math:`\lVert\mathbf{a}\rVert`, so the
            result scales with the anchor as a batch sample's does.

    Returns:
        The synthetic samples :math:`(G, D)`.
    """
    samples_per_class = layout.samples_per_class
    if mix.shape != (samples_per_class, samples_per_class - 1):
        raise ValueError(
            f"mix must have shape (K, K - 1) = ({samples_per_class}, "
            f"{samples_per_class - 1}), got {tuple(mix.shape)}"
        )
    if at_anchor_norm is not None and mask is None:
        raise ValueError("synthesize_groups takes at_anchor_norm with a mask only")
    dim = embeddings.size(1)
    coefficients = mix.to(embeddings.dtype)[layout.position[anchor]]  # (G, K - 1)
    if mask is None:
        anchors = gather_rows(embeddings, anchor).unsqueeze(1)
        positives = gather_rows(embeddings, layout.positive_index()[anchor]).unsqueeze(1)
        negatives = gather_rows(
            embeddings, layout.members[target_class] if members is None else members
        )
        moved = synthesize_negatives(
            anchors, positives, negatives, weights.view(-1, samples_per_class, dim), hardness
        )
        # unbind, not moved[:, k]: its backward writes one buffer, not K zero-filled ones.
        return _merge(moved.unbind(1), coefficients)

    # Only the joined samples are moved: one row per True of the mask, in row-major order.
    group, member = mask.nonzero(as_tuple=True)
    if isinstance(hardness, Tensor) and hardness.dim() == 1:
        hardness = hardness[group]
    # Gathered in this order (anchor, positive, member): the order in which the backward pass
    # adds their gradients, kept so that results stay bit for bit what they were.
    anchors = gather_rows(embeddings, anchor[group])
    positives = gather_rows(embeddings, layout.positive_index()[anchor[group]])
    negatives = gather_rows(
        embeddings,
        layout.members[target_class[group], member] if members is None else members[group, member],
    )
    if at_anchor_norm is not None:
        negatives = torch.where(
            at_anchor_norm[group, member].unsqueeze(1),
            F.normalize(negatives, dim=1) * torch.linalg.vector_norm(anchors, dim=1, keepdim=True),
            negatives,
        )
    moved_rows = synthesize_negatives(anchors, positives, negatives, weights, hardness)
    row = torch.zeros_like(mask, dtype=torch.long)  # slots not joined read row 0, unused
    row[group, member] = torch.arange(group.numel(), device=mask.device)
    slots = (gather_rows(moved_rows, row[:, k]) for k in range(samples_per_class))
    return _merge(slots, coefficients, mask)


def _merge(slots: Iterable[Tensor], coefficients: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""The merge of :func:`synthesize_groups`: the moved samples of a group's :math:`K` slots in
    order, :math:`\tilde{\mathbf{n}}_c \leftarrow \tilde{\mathbf{n}}_k + u_k (\tilde{\mathbf{n}}_c -
    \tilde{\mathbf{n}}_k)` for :math:`k = 1, \dots, K-1` from :math:`\tilde{\mathbf{n}}_0`.

    Args:
        slots: The moved sample of every group in slot :math:`k`, :math:`(G, D)`, for
            :math:`k = 0, \dots, K-1`; taken one at a time as the merge reaches it, so that a
            generator gathers each slot just before its step, as the masked path always did (the
            same operations in the same order, without all :math:`K` gathered slots alive at once).
        coefficients: :math:`u` of every group and step, :math:`(G, K - 1)`.
        mask: Bool :math:`(G, K)`: only the joined slots are merged, the first of them starting
            the merge; the rows of the others are not used. All if omitted.

    Returns:
        :math:`(G, D)`.
    """
    slots = iter(slots)
    synthetic = next(slots)
    started = None if mask is None else mask[:, :1]  # whether a joined sample has been merged
    for k, moved in enumerate(slots, 1):  # K is small: a loop over a class's samples
        merged = moved + coefficients[:, k - 1 : k] * (synthetic - moved)
        if mask is None:
            synthetic = merged
            continue
        joined = mask[:, k : k + 1]
        synthetic = torch.where(joined, torch.where(started, merged, moved), synthetic)
        started = started | joined
    return synthetic


def draw_mix(
    samples_per_class: int,
    rng: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    r"""The merge coefficients :math:`u \sim U(0, 1)` of :func:`synthesize_groups`, one per
    (anchor block, k): shape :math:`(K, K - 1)`. Drawn on the CPU from the random number
    generator `rng` (torch's default one if omitted), so every process of a distributed run draws
    the same values."""
    mix = torch.rand(samples_per_class, samples_per_class - 1, generator=rng)
    return mix.to(device) if device is not None else mix


def hardness_from_loss(alpha: float, mean_metric_loss: float) -> float:
    r"""The hardness factor :math:`h = \exp(-\alpha / \bar{J}_m)` of :func:`synthesize_negatives`.

    While the metric loss is high, :math:`h \approx 1` and synthetic negatives stay near the real
    ones; as it falls, :math:`h \to 0` and they are pulled in towards the positive's distance."""
    return math.exp(-alpha / mean_metric_loss)
