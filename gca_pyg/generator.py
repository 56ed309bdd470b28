r"""GCA-HNG's hard-negative generator, written once (docs/method.md, "The generator").

:class:`HardNegativeGenerator` owns everything of GCA-HNG that is not the embedding network or the
metric loss: the :class:`~gca_pyg.nn.CorrelationNet`, the softmax classifier, correlation →
fusion weights → synthesis, the generator's losses (:math:`J_{gen}`, :math:`J_{gce}`,
:math:`J_{cls}`) and the schedules that tie it to the metric loss (hardness and synthetic weight,
from the running means :math:`\bar{J}_m` and :math:`\bar{J}_{gen}`). Two front-ends use it:
:class:`~gca_pyg.model.GCAHNG` (the built-in trainer) and
:class:`~gca_pyg.pml.GCANegativeGenerator` (pytorch-metric-learning losses).
"""

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from gca_pyg.graph import BatchGraph
from gca_pyg.losses.generation import diversity_loss, similarity_loss, synthetic_class_loss
from gca_pyg.nn.correlation_net import CorrelationNet
from gca_pyg.schema import HARDNESS_SCALES, LossConfig, NetConfig
from gca_pyg.synthesis import SyntheticSamples, draw_mix, hardness_from_loss, synthesize_groups
from gca_pyg.utils import autocast, gather_rows

__all__ = ["HardNegativeGenerator", "GeneratedNegatives", "INITIAL_MEAN_LOSS"]

#: :math:`\bar{J}_m` and :math:`\bar{J}_{gen}` before the first epoch has ended: hardness ≈ 1
#: (synthetic negatives stay on the real ones) and a synthetic weight ≈ 0.
INITIAL_MEAN_LOSS = 1e6
#: Each step's loss is floored here before it enters a running mean, so a mean is never 0.
MIN_STEP_LOSS = 1e-6


class GeneratedNegatives(NamedTuple):
    """What :meth:`HardNegativeGenerator.forward` returns.

    Attributes:
        negatives: This process's synthetic negatives (:obj:`None` when not asked for).
        node_logits: The correlation net's node logits :math:`(N, C_{train})`, with autograd
            through the net (and the graph's embeddings): :math:`J_{gce}` is their
            cross-entropy.
    """

    negatives: Optional[SyntheticSamples]
    node_logits: Tensor


class HardNegativeGenerator(torch.nn.Module):
    r"""Globally correlation-aware synthesis of hard negatives (`"Globally Correlation-Aware Hard
    Negative Generation" <https://arxiv.org/abs/2411.13145>`_, IJCV 2025).

    A :class:`~gca_pyg.nn.CorrelationNet` on the batch graph (:class:`~gca_pyg.graph.BatchGraph`)
    gives per-channel fusion weights :math:`\boldsymbol{\lambda}_{ij}`, and every (anchor
    :math:`i`, class :math:`c`) group of the graph gets one synthetic sample
    (:func:`~gca_pyg.synthesis.synthesize_groups`),

    .. math::
        \tilde{\mathbf{n}}_{i,c} = \mathbf{a}_i + (\mathbf{n} - \mathbf{a}_i) \odot
        \frac{d^+ + (d^- - d^+)\,\boldsymbol{\lambda}_{i n}\,h}{d^-},
        \qquad h = \exp(-\alpha / \bar{J}_m),

    merged over the :math:`K` samples :math:`\mathbf{n}` of class :math:`c`. The generator is
    trained by

    .. math::
        J_{gen} = \tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div})

    (:meth:`generator_loss`, on detached embeddings), the net's node classifier by
    :math:`J_{gce}` and the softmax classifier behind :math:`J_{ce}` by :math:`J_{cls}`
    (:meth:`classifier_loss`). The metric loss weighs its synthetic term by
    :attr:`synthetic_weight` :math:`= 1 - \exp(-\beta / \bar{J}_{gen})`.

    The schedule state — :math:`\bar{J}_m`, :math:`\bar{J}_{gen}` and this epoch's sums behind them
    (:meth:`record`, :meth:`end_epoch`) — travels with :meth:`state_dict`, so a checkpoint resumes
    it exactly.

    Args:
        embedding_size (int): :math:`D`.
        num_classes (int): Training classes (node classifier and softmax classifier).
        num_layers (int, optional): :class:`~gca_pyg.nn.EdgeNodeConv` layers. (default: :obj:`2`)
        heads (int, optional): Attention heads per layer. (default: :obj:`4`)
        dropout (float, optional): Dropout of the edge attention. (default: :obj:`0.1`)
        edge_attention (str, optional): How the layers' node attention reads the edges, as in
            :class:`~gca_pyg.nn.EdgeNodeConv`; ``"none"`` is the paper's layer.
            (default: :obj:`"none"`)
        alpha (float, optional): :math:`\alpha` of the hardness, on the scale of
            `hardness_scale` (:math:`h = e^{-1}` when :math:`\bar{J}_m = \alpha`, or with
            ``"relative"`` when :math:`\bar{J}_m / \bar{J}_m^{(1)} = \alpha`). (default:
            :obj:`5.0`)
        hardness_scale (str, optional): ``"absolute"``: :math:`h = \exp(-\alpha / \bar{J}_m)`,
            the paper's schedule, on the metric loss's own scale; ``"relative"``: :math:`h =
            \exp(-\alpha\, \bar{J}_m^{(1)} / \bar{J}_m)` with :math:`\bar{J}_m^{(1)}` the
            first epoch's mean, so the schedule depends on how far the loss has fallen, not on its
            units (a metric loss whose values sit elsewhere than N-pair's gets the same
            schedule). (default: :obj:`"absolute"`)
        beta (float, optional): :math:`\beta` of the synthetic weight. (default: :obj:`20.0`)
        w_sim (float, optional): :math:`w_{sim}`. (default: :obj:`20.0`)
        w_div (float, optional): :math:`w_{div}`. (default: :obj:`60.0`)
        generator_ce_scale (float, optional): Scale of :math:`J_{ce}`. (default: :obj:`20.0`)
        classifier_scale (float, optional): Scale of :math:`J_{cls}`. (default: :obj:`10.0`)
        amp_dtype (torch.dtype, optional): Autocast dtype of the net's forward pass, or
            :obj:`None` for full precision. (default: :obj:`None`)
        process_group (torch.distributed.ProcessGroup, optional): The processes that share each
            batch graph's pairs (bound into the net once, here). (default: :obj:`None`)
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        num_layers: int = NetConfig.num_layers,
        heads: int = NetConfig.heads,
        dropout: float = NetConfig.dropout,
        *,
        edge_attention: str = NetConfig.edge_attention,
        alpha: float = LossConfig.alpha,
        hardness_scale: str = LossConfig.hardness_scale,
        beta: float = LossConfig.beta,
        w_sim: float = LossConfig.w_sim,
        w_div: float = LossConfig.w_div,
        generator_ce_scale: float = LossConfig.generator_ce_scale,
        classifier_scale: float = LossConfig.classifier_scale,
        amp_dtype: Optional[torch.dtype] = None,
        process_group: Optional[ProcessGroup] = None,
    ):
        super().__init__()
        if hardness_scale not in HARDNESS_SCALES:
            raise ValueError(
                f"hardness_scale must be one of {', '.join(HARDNESS_SCALES)}, got "
                f"{hardness_scale!r}"
            )
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.alpha, self.beta = alpha, beta
        self.hardness_scale = hardness_scale
        self.w_sim, self.w_div = w_sim, w_div
        self.generator_ce_scale, self.classifier_scale = generator_ce_scale, classifier_scale
        self.amp_dtype = amp_dtype
        self.process_group = process_group
        self.net = CorrelationNet(
            embedding_size,
            num_classes,
            num_layers=num_layers,
            heads=heads,
            dropout=dropout,
            edge_attention=edge_attention,
            process_group=process_group,
        )
        self.classifier = torch.nn.Linear(embedding_size, num_classes)
        self.mean_metric_loss = INITIAL_MEAN_LOSS
        self.first_mean_metric_loss: Optional[float] = None  # J̄_m of the first epoch
        self.mean_generator_loss = INITIAL_MEAN_LOSS
        self._sums = {"metric": 0.0, "generator": 0.0}
        self._counts = {"metric": 0, "generator": 0}

    @classmethod
    def from_config(
        cls,
        embedding_size: int,
        num_classes: int,
        net: NetConfig,
        loss: LossConfig,
        **kwargs: Any,
    ) -> "HardNegativeGenerator":
        """The generator of the ``net`` and ``loss`` sections of a config (`kwargs`:
        ``amp_dtype``, ``process_group``)."""
        return cls(
            embedding_size,
            num_classes,
            num_layers=net.num_layers,
            heads=net.heads,
            dropout=net.dropout,
            edge_attention=net.edge_attention,
            alpha=loss.alpha,
            hardness_scale=loss.hardness_scale,
            beta=loss.beta,
            w_sim=loss.w_sim,
            w_div=loss.w_div,
            generator_ce_scale=loss.generator_ce_scale,
            classifier_scale=loss.classifier_scale,
            **kwargs,
        )

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    # -- schedules -----------------------------------------------------------------------------
    @property
    def hardness(self) -> float:
        r"""The hardness :math:`h = \exp(-\alpha / \bar{J}_m)` of synthesis (with
        :attr:`hardness_scale` ``"relative"``, :math:`\bar{J}_m` divided by the first epoch's;
        :math:`h \approx 1` until an epoch has ended)."""
        loss = self.mean_metric_loss
        if self.hardness_scale == "relative" and self.first_mean_metric_loss is not None:
            loss = loss / self.first_mean_metric_loss
        return hardness_from_loss(self.alpha, loss)

    @property
    def synthetic_weight(self) -> float:
        r"""The weight :math:`w = 1 - \exp(-\beta / \bar{J}_{gen})` of the metric loss's
        synthetic term: about 0 until the generator's mean loss is known."""
        return 1.0 - math.exp(-self.beta / self.mean_generator_loss)

    def record(self, metric_loss: Optional[float] = None, generator_loss: Optional[float] = None):
        """Adds one step's :math:`J_m` and/or :math:`J_{gen}` (floored at 1e-6) to this epoch's
        running means."""
        for name, value in (("metric", metric_loss), ("generator", generator_loss)):
            if value is not None:
                self._sums[name] += max(float(value), MIN_STEP_LOSS)
                self._counts[name] += 1

    def end_epoch(self, mean_metric_loss: Optional[float] = None):
        r"""Rolls :math:`\bar{J}_m` and :math:`\bar{J}_{gen}` over the steps :meth:`record`ed since
        the last call (a mean without steps stays as it was), or sets :math:`\bar{J}_m` to
        `mean_metric_loss` when given."""
        if mean_metric_loss is not None:
            self.mean_metric_loss = float(mean_metric_loss)
        elif self._counts["metric"]:
            self.mean_metric_loss = self._sums["metric"] / self._counts["metric"]
        if self.first_mean_metric_loss is None and self.mean_metric_loss != INITIAL_MEAN_LOSS:
            self.first_mean_metric_loss = self.mean_metric_loss
        if self._counts["generator"]:
            self.mean_generator_loss = self._sums["generator"] / self._counts["generator"]
        self._sums = {"metric": 0.0, "generator": 0.0}
        self._counts = {"metric": 0, "generator": 0}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "mean_metric_loss": self.mean_metric_loss,
            "first_mean_metric_loss": self.first_mean_metric_loss,
            "mean_generator_loss": self.mean_generator_loss,
            "sums": dict(self._sums),
            "counts": dict(self._counts),
        }

    def set_extra_state(self, state: dict[str, Any]):
        self.mean_metric_loss = float(state["mean_metric_loss"])
        first = state.get("first_mean_metric_loss")  # absent before loss.hardness_scale
        self.first_mean_metric_loss = None if first is None else float(first)
        self.mean_generator_loss = float(state["mean_generator_loss"])
        self._sums = {name: float(value) for name, value in state["sums"].items()}
        self._counts = {name: int(value) for name, value in state["counts"].items()}

    # -- correlation and synthesis -------------------------------------------------------------
    def correlate(
        self, embeddings: Tensor, graph: BatchGraph, *, detach_fusion: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""The net on the graph of `embeddings`: node logits :math:`(N, C_{train})` and the
        fusion weights of this process's pairs :math:`(E_r, D)`, in the parameters' dtype.

        Args:
            detach_fusion: Compute the fusion weights without autograd (see
                :class:`~gca_pyg.nn.CorrelationNet`).
        """
        data = graph.data(embeddings)  # memory nodes, if any, after the batch's
        with autocast(self.device, self.amp_dtype):
            node_logits, fusion = self.net(
                data.x,
                data.edge_index,
                data.edge_attr,
                data.neg_mask,
                undirected=True,
                detach_fusion=detach_fusion,
            )
        dtype = self.classifier.weight.dtype  # autocast may have produced bf16
        return node_logits[: graph.num_nodes].to(dtype), fusion.to(dtype)

    def synthesize(
        self,
        embeddings: Tensor,
        graph: BatchGraph,
        fusion: Tensor,
        mix: Optional[Tensor] = None,
        *,
        own_class: bool = False,
    ) -> SyntheticSamples:
        """The synthetic samples of this process's groups, at the current :attr:`hardness`.

        Args:
            embeddings: The batch :math:`(N, D)`.
            graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
            fusion: The fusion weights of its pairs, from :meth:`correlate`.
            mix: Merge coefficients :math:`(K, K - 1)` (:func:`~gca_pyg.synthesis.draw_mix`);
                drawn from torch's generator if omitted.
            own_class: Also the groups of each anchor's own class (not negatives).
        """
        layout, shard = graph.layout, graph.shard
        if mix is None:
            mix = draw_mix(layout.samples_per_class, device=embeddings.device)
        anchor, target_class, edges, mask, members = (
            shard.anchor,
            shard.target_class,
            shard.edges,
            shard.mask,
            shard.members,
        )
        if not own_class:
            keep = target_class != layout.class_index[anchor]
            anchor, target_class, edges = anchor[keep], target_class[keep], edges[keep]
            mask = None if mask is None else mask[keep]
            members = None if members is None else members[keep]
        weights = gather_rows(fusion, edges if mask is None else edges[mask])
        synthetic = synthesize_groups(
            graph.node_embeddings(embeddings),
            layout,
            anchor,
            target_class,
            weights,
            self.hardness,
            mix,
            mask,
            members,
            at_anchor_norm=None if members is None else members >= graph.num_nodes,
        )
        return SyntheticSamples(embeddings=synthetic, anchor=anchor, class_index=target_class)

    def forward(
        self,
        embeddings: Tensor,
        graph: BatchGraph,
        mix: Optional[Tensor] = None,
        *,
        with_negatives: bool = True,
        node_loss_to_embeddings: bool = True,
    ) -> GeneratedNegatives:
        r"""The synthetic negatives of `embeddings` and the net's node logits, in one pass of the
        net: what the metric loss takes. Both front-ends call it:
        :class:`~gca_pyg.model.GCAHNG` (whose metric update adds :math:`J_{gce} =
        \mathrm{CE}(\text{node logits}, y)`) and :class:`~gca_pyg.pml.GCANegativeGenerator`.

        The negatives are differentiable in `embeddings`; the fusion weights are computed without
        autograd, so the metric loss never trains the net through them. The node logits keep
        their autograd: :math:`J_{gce}` trains the net (and, through the graph, the embeddings;
        with `node_loss_to_embeddings` off the graph is built from detached embeddings, so it
        trains the net alone).

        Args:
            embeddings: The batch :math:`(N, D)`.
            graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
            mix: Merge coefficients, as in :meth:`synthesize`.
            with_negatives: Synthesise the negatives (off: the node logits alone).
            node_loss_to_embeddings: Whether the node logits' gradient reaches `embeddings`.
        """
        graph_input = embeddings if node_loss_to_embeddings else embeddings.detach()
        node_logits, fusion = self.correlate(graph_input, graph, detach_fusion=True)
        negatives = self.synthesize(embeddings, graph, fusion, mix) if with_negatives else None
        return GeneratedNegatives(negatives, node_logits)

    # -- the generator's own losses ------------------------------------------------------------
    def generator_loss(
        self,
        embeddings: Tensor,
        graph: BatchGraph,
        mix: Optional[Tensor] = None,
        *,
        node_loss: bool = False,
    ) -> dict[str, Tensor]:
        r""":math:`J_{gen} = \tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div})` on detached
        embeddings, for the net alone. :math:`J_{ce}` covers every group (own class included),
        :math:`J_{sim}` the other-class ones (see :mod:`gca_pyg.losses` for the sparse graph).

        Args:
            node_loss: Also return :math:`J_{gce}` of the same forward pass.

        Returns:
            ``J_gen``, ``J_ce``, ``J_sim``, ``J_div`` (and ``J_gce``) by name.
        """
        embeddings = embeddings.detach()
        node_logits, fusion = self.correlate(embeddings, graph)
        synthetic = self.synthesize(embeddings, graph, fusion, mix, own_class=True)
        j_ce = synthetic_class_loss(
            synthetic, graph, self._frozen_classifier, self.generator_ce_scale
        )
        j_sim = similarity_loss(embeddings, synthetic, graph)
        j_div = diversity_loss(fusion, graph)
        j_gen = 0.5 * (j_ce + self.w_sim * j_sim + self.w_div * j_div)
        losses = {"J_gen": j_gen, "J_ce": j_ce, "J_sim": j_sim, "J_div": j_div}
        if node_loss:
            losses["J_gce"] = F.cross_entropy(node_logits, graph.labels)
        return losses

    def classifier_loss(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        r""":math:`J_{cls} = 10\,\mathrm{CE}(W_s z, y)` on detached embeddings: trains the softmax
        classifier that :math:`J_{ce}` reads."""
        j_cls = self.classifier_scale * F.cross_entropy(
            self.classifier(embeddings.detach()), labels
        )
        return {"J_cls": j_cls}

    def _frozen_classifier(self, x: Tensor) -> Tensor:
        """The softmax classifier as a fixed function: :math:`J_{ce}` must not train it."""
        return F.linear(x, self.classifier.weight.detach(), self.classifier.bias.detach())

    def extra_repr(self) -> str:
        return (
            f"{self.embedding_size}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"hardness_scale={self.hardness_scale!r}, beta={self.beta}"
        )
