"""GCA-HNG: backbone + embedding head + hard-negative generator + metric loss, and the losses of
its three alternating updates (docs/method.md). The optimisers and learning-rate schedules that
drive the updates live in :class:`gca_pyg.trainer.AlternatingTrainer`."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn import BatchNorm1d, Linear, Sequential

from gca_pyg.backbones import build_backbone
from gca_pyg.config import Config
from gca_pyg.distributed import all_gather_rows, all_reduce_sum
from gca_pyg.generator import HardNegativeGenerator
from gca_pyg.graph import BatchGraph
from gca_pyg.losses import MetricLoss, build_metric_loss
from gca_pyg.nn import L2Normalize
from gca_pyg.runtime import autocast_dtype, use_channels_last
from gca_pyg.schema import GraphConfig, LossConfig, NetConfig
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.utils import autocast


class GCAHNG(torch.nn.Module):
    r"""Globally Correlation-Aware Hard Negative Generation around any backbone and metric loss.

    :math:`\mathbf{z} = \mathrm{Linear}(\mathrm{BN}(\mathrm{backbone}(x)))`; a
    :class:`~gca_pyg.generator.HardNegativeGenerator` synthesises hard negatives from the batch
    graph of :math:`\mathbf{z}`, and the metric loss (a :class:`~gca_pyg.losses.MetricLoss` such
    as :class:`~gca_pyg.losses.NPairLoss`, ``loss.metric``) takes the real batch
    (:math:`J_m`) and the synthetic negatives (:math:`J_{syn}`). The module holds the networks and
    computes the losses of the three updates (:meth:`metric_loss`, :meth:`classifier_loss`,
    :meth:`generator_loss`), each from the step's :class:`~gca_pyg.graph.BatchGraph`;
    :class:`~gca_pyg.trainer.AlternatingTrainer` owns the optimisers and runs them.

    Args:
        backbone: Image → feature module with an ``out_features`` attribute (see
            :func:`gca_pyg.backbones.build_backbone`).
        num_classes: Number of training classes.
        embedding_size: :math:`D`. (default: 512)
        net, loss: :class:`~gca_pyg.schema.NetConfig`, :class:`~gca_pyg.schema.LossConfig`.
        graph: :class:`~gca_pyg.graph.GraphConfig`: the complete batch graph (the default) or a
            sparse one.
        amp_dtype: Autocast dtype of the forward passes (e.g. ``torch.bfloat16``), or None for fp32.
        channels_last: Run the backbone in ``torch.channels_last`` memory format (its weights and
            the images), which oneDNN and cuDNN convolutions often run faster.
        normalize: L2-normalise the embeddings the head returns, in training too (an
            :class:`~gca_pyg.nn.L2Normalize` after its Linear; the reference's ``MODEL.NORM``).
            Retrieval normalises them either way.
        process_group: The processes that train one model on one batch graph (``torchrun``),
            bound once, here, as :class:`torch.nn.SyncBatchNorm` binds its group: in training mode
            the pooled features of all of them are gathered before the embedding head, and the
            generator splits each batch graph's pairs between them. :obj:`None` for one process.
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
        process_group: Optional[ProcessGroup] = None,
    ):
        super().__init__()
        self.channels_last = channels_last
        self.net_config = net or NetConfig()
        self.loss_config = loss or LossConfig()
        self.graph_config = graph or GraphConfig()
        self.amp_dtype = amp_dtype
        self.process_group = process_group
        self.backbone = (
            backbone.to(memory_format=torch.channels_last) if channels_last else backbone
        )
        self.embedding = Sequential(
            BatchNorm1d(backbone.out_features),
            Linear(backbone.out_features, embedding_size),
            *([L2Normalize()] if normalize else []),
        )
        self.generator = HardNegativeGenerator.from_config(
            embedding_size,
            num_classes,
            self.net_config,
            self.loss_config,
            amp_dtype=amp_dtype,
            process_group=process_group,
        )
        self.criterion: MetricLoss = build_metric_loss(
            self.loss_config, num_classes, embedding_size
        )

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def forward(self, images: Tensor, *, freeze_backbone: bool = False) -> Tensor:
        """Embeddings :math:`\\mathbf{z}` (not normalised) of a batch of images.

        In training mode with a process group, the pooled features of all its processes are
        gathered (with autograd) before the embedding head, so the result is the embeddings of the
        whole batch, rank by rank, and the head's BatchNorm sees the whole batch; in evaluation
        mode each process embeds its own images.

        Args:
            images: This process's images.
            freeze_backbone: Run the backbone without gradients (warm-up).
        """
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
                features = self.backbone(images)
            if self.training:
                features = all_gather_rows(features, self.process_group)
            embeddings = self.embedding(features)
        return embeddings.to(self.generator.classifier.weight.dtype)  # autocast may give bf16

    @torch.no_grad()
    def embed(self, images: Tensor, *, unit: bool = False) -> Tensor:
        """Evaluation embeddings of a batch of images: moved to the model's device, in eval mode
        (the previous mode is restored), without gradients, in the model's autocast.

        Args:
            images: The batch, on any device.
            unit: Return the retrieval embeddings: rows L2-normalised, in float32.
        """
        was_training = self.training
        self.eval()
        try:
            embeddings = self(images.to(self.device, non_blocking=True))
        finally:
            self.train(was_training)
        return F.normalize(embeddings.float(), dim=1) if unit else embeddings

    def metric_loss(
        self,
        embeddings: Tensor,
        graph: BatchGraph,
        mix: Optional[Tensor] = None,
        *,
        diagnostics: bool = False,
    ) -> dict[str, Tensor]:
        """:math:`J_{metric} = J_m + w J_{syn} + J_{gce}` (fusion weights detached), for the
        backbone, the embedding head, the correlation net (through :math:`J_{gce}`) and the metric
        loss's own parameters (proxies); :math:`w` is the generator's
        :attr:`~gca_pyg.generator.HardNegativeGenerator.synthetic_weight`. Returns every term by
        name.

        On a sparse graph each anchor's synthetic negatives cover the classes it is joined to
        (see :mod:`gca_pyg.losses`). With `diagnostics` (and synthesis on) the dict also holds
        the detached measures of :meth:`synthesis_diagnostics`."""
        j_m = self.criterion(embeddings, graph.labels, layout=graph.layout)
        synthesis = self.loss_config.synthesis
        generated = self.generator(
            embeddings,
            graph,
            mix,
            with_negatives=synthesis,
            node_loss_to_embeddings=self.loss_config.node_loss_to_embeddings,
        )
        negatives = generated.negatives
        j_gce = F.cross_entropy(generated.node_logits, graph.labels)
        losses = {"J_m": j_m, "J_gce": j_gce}
        j_metric = j_m + j_gce
        if synthesis:
            j_syn = self.criterion.synthetic_loss(embeddings, negatives, graph)
            j_metric = j_metric + self.generator.synthetic_weight * j_syn
            losses["J_syn"] = j_syn
            if diagnostics:
                losses.update(self.synthesis_diagnostics(embeddings, graph, j_m, j_syn, negatives))
        losses["J_metric"] = j_metric
        return losses

    def synthesis_diagnostics(
        self,
        embeddings: Tensor,
        graph: BatchGraph,
        j_m: Tensor,
        j_syn: Tensor,
        negatives: SyntheticSamples,
    ) -> dict[str, Tensor]:
        r"""How the synthetic term meets the metric loss, as detached scalars (``diag_*``):

        * ``diag_grad_z_J_m``, ``diag_grad_z_J_syn``: the norms of the gradients of :math:`J_m`
          and of :math:`w J_{syn}` (as the update weighs it) with respect to the embeddings;
        * ``diag_grad_proxies_J_m``, ``diag_grad_proxies_J_syn``: the same for the metric
          loss's proxies, where it has any;
        * ``diag_cos_anchor_proxy``: mean cosine of each anchor to its class centre;
          ``diag_cos_syn_anchor_proxy``, ``diag_cos_syn_own_proxy``: of each synthetic
          negative to its anchor's class centre and to the centre of the class it stands for;
          ``diag_cos_syn_anchor``: of each synthetic negative to its anchor. A class centre is
          the proxy where the metric loss has proxies, else the generator's softmax classifier
          weight of the class.

        The gradients are this process's (its synthetic negatives); the cosines are means over
        every process's rows. Computing them costs one extra backward pass through the losses
        (not the backbone)."""
        proxies = self.criterion.class_centres
        inputs = [embeddings] + ([proxies] if proxies is not None else [])
        weighted = self.generator.synthetic_weight * j_syn
        measures = {}
        for name, loss in (("J_m", j_m), ("J_syn", weighted)):
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            for what, grad in zip(("z", "proxies"), grads):
                norm = torch.zeros(()) if grad is None else grad.detach().norm()
                measures[f"diag_grad_{what}_{name}"] = norm
        with torch.no_grad():
            centres = F.normalize(
                proxies if proxies is not None else self.generator.classifier.weight, dim=-1
            )
            unit = F.normalize(embeddings, dim=-1)
            synthetic = F.normalize(negatives.embeddings, dim=-1)
            anchor_label = graph.labels[negatives.anchor]
            is_negative = negatives.is_negative(graph.layout).to(unit.dtype)
            rows = {
                "diag_cos_syn_anchor_proxy": (synthetic * centres[anchor_label]).sum(-1),
                "diag_cos_syn_own_proxy": (
                    synthetic * centres[negatives.labels(graph.classes)]
                ).sum(-1),
                "diag_cos_syn_anchor": (synthetic * unit[negatives.anchor]).sum(-1),
            }
            for name, values in rows.items():
                total = all_reduce_sum((values * is_negative).sum(), self.process_group)
                count = all_reduce_sum(is_negative.sum(), self.process_group)
                measures[name] = total / count.clamp_min(1)
            measures["diag_cos_anchor_proxy"] = (unit * centres[graph.labels]).sum(-1).mean()
        return measures

    def classifier_loss(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """:math:`J_{cls}` (see :meth:`HardNegativeGenerator.classifier_loss
        <gca_pyg.generator.HardNegativeGenerator.classifier_loss>`)."""
        return self.generator.classifier_loss(embeddings, labels)

    def generator_loss(
        self, embeddings: Tensor, graph: BatchGraph, mix: Optional[Tensor] = None
    ) -> dict[str, Tensor]:
        """:math:`J_{gen}` and its terms (see :meth:`HardNegativeGenerator.generator_loss
        <gca_pyg.generator.HardNegativeGenerator.generator_loss>`), for the net alone."""
        return self.generator.generator_loss(embeddings, graph, mix)


def build_model(
    config: Config,
    num_classes: int,
    device: torch.device,
    *,
    pretrained: bool = True,
    process_group: Optional[ProcessGroup] = None,
) -> GCAHNG:
    """The GCA-HNG model of `config` on `device`; `process_group` is that of a ``torchrun``
    training run.

    With `pretrained`, the backbone's pretrained weights (``model.pretrained``) are loaded, unless
    ``model.init`` names a checkpoint to start from: that one
    :func:`gca_pyg.checkpoint.initial_model` loads. Evaluation and a resumed run load every weight
    from their checkpoint and pass ``False``: the same network, nothing read or downloaded."""
    model_config = config.model
    backbone = build_backbone(
        model_config.backbone,
        pretrained=model_config.pretrained,
        frozen_bn=model_config.frozen_bn,
        pooling=model_config.pooling,
        image_size=config.data.image_size,
        load_weights=pretrained and model_config.init is None,
    )
    model = GCAHNG(
        backbone,
        num_classes,
        model_config.embedding_size,
        net=config.net,
        loss=config.loss,
        graph=config.graph,
        amp_dtype=autocast_dtype(config.train.precision, device),
        channels_last=use_channels_last(config.train.memory_format, config.train.precision, device),
        normalize=model_config.normalize,
        process_group=process_group,
    )
    if model_config.head_init == "orthogonal":
        head = model.embedding[1]
        torch.nn.init.orthogonal_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return model.to(device)
