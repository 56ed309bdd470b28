"""GCA-HNG: backbone + embedding head + correlation net + classifier, and the losses of its three
alternating updates (docs/method.md). The optimisers, schedules and running means that drive the
updates live in :class:`gca_pyg.trainer.AlternatingTrainer`."""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Linear, Sequential

from gca_pyg.distributed import gather_rows as gather_processes
from gca_pyg.generator import synthesize_groups
from gca_pyg.graph import EdgeShard, GraphConfig, build_batch_graph
from gca_pyg.layout import ClassLayout
from gca_pyg.losses import (
    diversity_loss,
    npair_loss,
    similarity_loss,
    synthetic_class_loss,
    synthetic_npair_loss,
)
from gca_pyg.nn import CorrelationNet, L2Normalize
from gca_pyg.utils import gather_rows


@dataclass
class NetConfig:
    """The correlation net: 2 layers × 4 heads for CUB/Cars, 1 × 2 for SOP/InShop."""

    num_layers: int = 2
    heads: int = 4
    dropout: float = 0.1


@dataclass
class LossConfig:
    """Loss weights (ResNet-50 CUB values as defaults; docs/method.md, "Losses")."""

    alpha: float = 5.0  # hardness h = exp(-alpha / J̄_m)
    beta: float = 20.0  # J_syn weight 1 - exp(-beta / J̄_gen)
    w_sim: float = 20.0
    w_div: float = 60.0
    generator_ce_scale: float = 20.0
    classifier_scale: float = 10.0
    l2_reg: float = 3e-3
    synthesis: bool = True  # False: J_metric = J_m + J_gce, no generator update (ablation)


class GCAHNG(torch.nn.Module):
    r"""Globally Correlation-Aware Hard Negative Generation around any backbone.

    :math:`\mathbf{z} = \mathrm{Linear}(\mathrm{BN}(\mathrm{backbone}(x)))`; a
    :class:`~gca_pyg.nn.CorrelationNet` on the batch graph of :math:`\mathbf{z}` yields per-channel
    fusion weights, from which :func:`~gca_pyg.generator.synthesize_groups` builds hard negatives;
    a linear softmax classifier keeps synthetic samples on their class. The module holds the
    networks and computes the losses of the three updates (:meth:`metric_loss`,
    :meth:`classifier_loss`, :meth:`generator_loss`); :class:`~gca_pyg.trainer.AlternatingTrainer`
    owns the optimisers and runs them.

    Every loss takes the batch's :class:`~gca_pyg.layout.ClassLayout` and the
    :class:`~gca_pyg.graph.EdgeShard` of graph pairs this process stores (the whole graph for one
    process, or the sparse graph of :func:`~gca_pyg.graph.knn_pairs` and
    :func:`~gca_pyg.graph.sparse_shard` when ``graph.neighbors`` is set), and a process ``group``
    (``None`` for one process) over which the graph is split.

    Args:
        backbone: Image → feature module with an ``out_features`` attribute (see
            :func:`gca_pyg.backbones.build_backbone`).
        num_classes: Number of training classes.
        embedding_size: :math:`D`. (default: 512)
        net, loss: :class:`NetConfig`, :class:`LossConfig`.
        graph: :class:`~gca_pyg.graph.GraphConfig`: the complete batch graph (the default) or a
            sparse one.
        amp_dtype: Autocast dtype of the forward passes (e.g. ``torch.bfloat16``), or None for fp32.
        channels_last: Run the backbone in ``torch.channels_last`` memory format (its weights and
            the images), which oneDNN and cuDNN convolutions often run faster.
        normalize: L2-normalise the embeddings the head returns, in training too (an
            :class:`~gca_pyg.nn.L2Normalize` after its Linear; the reference's ``MODEL.NORM``).
            Retrieval normalises them either way.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int,
        embedding_size: int = 512,
        *,
        net: Optional[NetConfig] = None,
        loss: Optional[LossConfig] = None,
        graph: Optional[GraphConfig] = None,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        normalize: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.net_config = net or NetConfig()
        self.loss_config = loss or LossConfig()
        self.graph_config = graph or GraphConfig()
        self.amp_dtype = amp_dtype
        self.backbone = (
            backbone.to(memory_format=torch.channels_last) if channels_last else backbone
        )
        self.embedding = Sequential(
            BatchNorm1d(backbone.out_features),
            Linear(backbone.out_features, embedding_size),
            *([L2Normalize()] if normalize else []),
        )
        self.net = CorrelationNet(
            embedding_size,
            num_classes,
            num_layers=self.net_config.num_layers,
            heads=self.net_config.heads,
            dropout=self.net_config.dropout,
        )
        self.classifier = Linear(embedding_size, num_classes)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _out_of_autocast(self, tensor: Tensor) -> Tensor:
        """`tensor` in the parameters' dtype (autocast may have produced it in bf16)."""
        return tensor.to(self.classifier.weight.dtype)

    def forward(self, images: Tensor, *, freeze_backbone: bool = False, group=None) -> Tensor:
        """Embeddings :math:`\\mathbf{z}` (not normalised) of a batch of images.

        Args:
            images: This process's images.
            freeze_backbone: Run the backbone without gradients (warm-up).
            group: A process group: the pooled features of all its processes are gathered (with
                autograd) before the embedding head, so the result is the embeddings of the whole
                batch, rank by rank, and the head's BatchNorm sees the whole batch.
        """
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
                features = self.backbone(images)
            return self._out_of_autocast(self.embedding(gather_processes(features, group)))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Evaluation embeddings: eval mode, no gradients; the previous mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return self(images.to(self.device, non_blocking=True))
        finally:
            self.train(was_training)

    def correlate(
        self,
        embeddings: Tensor,
        labels: Tensor,
        shard: EdgeShard,
        *,
        detach_fusion: bool = False,
        group=None,
    ) -> tuple[Tensor, Tensor]:
        """Node logits :math:`(N, C_{train})` and the fusion weights of the shard's pairs
        :math:`(E_r, D)`, from the batch graph of `embeddings`."""
        graph = build_batch_graph(embeddings, labels, undirected=True, edge_index=shard.edge_index)
        with self._autocast():
            node_logits, fusion = self.net(
                graph.x,
                graph.edge_index,
                graph.edge_attr,
                graph.neg_mask,
                undirected=True,
                detach_fusion=detach_fusion,
                group=group,
            )
        return self._out_of_autocast(node_logits), self._out_of_autocast(fusion)

    def _synthesize(
        self,
        embeddings: Tensor,
        layout: ClassLayout,
        shard: EdgeShard,
        fusion: Tensor,
        hardness: float,
        mix: Tensor,
        own_class: bool,
    ):
        """The shard's synthetic samples, their class rows and anchors (optionally without the
        groups of the anchor's own class)."""
        anchor, target_class, edges = shard.anchor, shard.target_class, shard.edges
        mask = shard.mask
        if not own_class:
            keep = target_class != layout.class_index[anchor]
            anchor, target_class, edges = anchor[keep], target_class[keep], edges[keep]
            mask = None if mask is None else mask[keep]
        weights = gather_rows(fusion, edges if mask is None else edges[mask])
        synthetic = synthesize_groups(
            embeddings, layout, anchor, target_class, weights, hardness, mix, mask
        )
        return synthetic, target_class, anchor

    def metric_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        layout: ClassLayout,
        shard: EdgeShard,
        *,
        hardness: float,
        synthetic_weight: float,
        mix: Tensor,
        group=None,
    ) -> dict[str, Tensor]:
        """:math:`J_{metric} = J_m + w J_{syn} + J_{gce}` (fusion weights detached), for the
        backbone, the embedding head and the correlation net. Returns every term by name.

        On a sparse graph each anchor's :math:`J_{syn}` logits cover the classes it is joined to
        (see :func:`~gca_pyg.losses.synthetic_npair_loss`)."""
        cfg = self.loss_config
        j_m = npair_loss(embeddings, labels, cfg.l2_reg, layout=layout)
        node_logits, fusion = self.correlate(
            embeddings, labels, shard, detach_fusion=True, group=group
        )
        j_gce = F.cross_entropy(node_logits, labels)
        losses = {"J_m": j_m, "J_gce": j_gce}
        j_metric = j_m + j_gce
        if cfg.synthesis:
            synthetic, target_class, anchor = self._synthesize(
                embeddings, layout, shard, fusion, hardness, mix, own_class=False
            )
            connected = (
                None
                if shard.mask is None
                else shard.connected(embeddings.size(0), layout.num_classes, group)
            )
            j_syn = synthetic_npair_loss(
                embeddings,
                labels,
                synthetic,
                layout.classes[target_class],
                anchor,
                cfg.l2_reg,
                layout=layout,
                connected=connected,
                group=group,
            )
            j_metric = j_metric + synthetic_weight * j_syn
            losses["J_syn"] = j_syn
        losses["J_metric"] = j_metric
        return losses

    def classifier_loss(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """:math:`J_{cls} = 10\\,\\mathrm{CE}(W_s z, y)` on detached embeddings (classifier)."""
        j_cls = self.loss_config.classifier_scale * F.cross_entropy(
            self.classifier(embeddings.detach()), labels
        )
        return {"J_cls": j_cls}

    def generator_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        layout: ClassLayout,
        shard: EdgeShard,
        *,
        hardness: float,
        mix: Tensor,
        group=None,
    ) -> dict[str, Tensor]:
        """:math:`J_{gen} = \\tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div})` on detached
        embeddings, for the correlation net alone. :math:`J_{ce}` covers all :math:`N C` synthetic
        samples (own class included), :math:`J_{sim}` the other-class ones.

        On a sparse graph :math:`J_{ce}` covers the groups present (own class included),
        :math:`J_{sim}` sums over the other-class ones and divides by the number of groups present,
        and :math:`J_{div}` runs over the stored pairs (see :func:`~gca_pyg.losses.diversity_loss`);
        on the complete graph each is the term above."""
        cfg = self.loss_config
        embeddings = embeddings.detach()
        _, fusion = self.correlate(embeddings, labels, shard, group=group)
        synthetic, target_class, anchor = self._synthesize(
            embeddings, layout, shard, fusion, hardness, mix, own_class=True
        )
        j_ce = synthetic_class_loss(
            synthetic,
            layout.classes[target_class],
            self._frozen_classifier,
            cfg.generator_ce_scale,
            group=group,
        )
        is_other = target_class != layout.class_index[anchor]
        j_sim = similarity_loss(
            embeddings,
            synthetic,
            anchor,
            layout.num_classes,
            mask=is_other,
            num_groups=None if shard.mask is None else shard.total_groups(group),
            group=group,
        )
        j_div = diversity_loss(
            fusion, edge_index=shard.edge_index, num_nodes=embeddings.size(0), group=group
        )
        j_gen = 0.5 * (j_ce + cfg.w_sim * j_sim + cfg.w_div * j_div)
        return {"J_gen": j_gen, "J_ce": j_ce, "J_sim": j_sim, "J_div": j_div}

    def _frozen_classifier(self, x: Tensor) -> Tensor:
        """The softmax classifier as a fixed function: the generator update must not touch it."""
        return F.linear(x, self.classifier.weight.detach(), self.classifier.bias.detach())
