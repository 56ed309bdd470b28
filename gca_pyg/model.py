"""GCA-HNG: backbone + embedding head + correlation net + generator, and one training step
(SPEC.md §5)."""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Linear, Sequential

from gca_pyg.errors import NonFiniteLossError
from gca_pyg.generator import HardNegativeGenerator, hardness_from_loss
from gca_pyg.graph import build_batch_graph, to_dense_edges
from gca_pyg.losses import (diversity_loss, npair_loss, similarity_loss, synthetic_class_loss,
                            synthetic_npair_loss)
from gca_pyg.nn import CorrelationNet

#: J̄_m and J̄_gen before the first epoch has ended: hardness ≈ 1 and J_syn's weight ≈ 0.
INITIAL_MEAN_LOSS = 1e6


@dataclass
class NetConfig:
    """The correlation net (SPEC.md §2): 2 layers × 4 heads for CUB/Cars, 1 × 2 for SOP/InShop."""
    num_layers: int = 2
    heads: int = 4
    dropout: float = 0.1


@dataclass
class LossConfig:
    """Loss weights of SPEC.md §5–§6 (ResNet-50 CUB values as defaults)."""
    alpha: float = 5.0  # hardness h = exp(-alpha / J̄_m)
    beta: float = 20.0  # J_syn weight 1 - exp(-beta / J̄_gen)
    w_sim: float = 20.0
    w_div: float = 60.0
    generator_ce_scale: float = 20.0
    classifier_scale: float = 10.0
    l2_reg: float = 3e-3
    synthesis: bool = True  # False: J_metric = J_m + J_gce, no generator update (ablation)


@dataclass
class OptimConfig:
    """Optimisers and schedules of SPEC.md §6 (ResNet-50 CUB values as defaults)."""
    epochs: int = 100
    metric_lr: float = 1.5e-4
    embedding_lr_ratio: float = 1.0  # embedding head lr = metric_lr × this
    net_lr: float = 1.5e-4
    classifier_lr: float = 1e-3
    weight_decay: float = 1e-4
    classifier_weight_decay: float = 1e-2  # the reference leaves AdamW's default here
    metric_lr_step: int = 10  # StepLR period in epochs of the metric lr
    metric_lr_gamma: float = 0.5
    warmup_epochs: int = 2  # backbone frozen for the first epochs
    grad_clip: float = 10.0  # clip gradients by value, backbone and net


class GCAHNG(torch.nn.Module):
    r"""Globally Correlation-Aware Hard Negative Generation around any backbone.

    :math:`\mathbf{z} = \mathrm{Linear}(\mathrm{BN}(\mathrm{backbone}(x)))`; a
    :class:`~gca_pyg.nn.CorrelationNet` on the batch graph of :math:`\mathbf{z}` yields per-channel
    fusion weights, from which :func:`~gca_pyg.generator.synthesize_batch` builds hard negatives;
    a linear softmax classifier keeps them on their class. :meth:`training_step` runs the three
    alternating updates of SPEC.md §5, each with its own optimiser.

    Args:
        backbone: Image → feature module with an ``out_features`` attribute (see
            :func:`gca_pyg.backbones.build_backbone`).
        num_classes: Number of training classes.
        embedding_size: :math:`D`. (default: 512)
        net, loss, optim: :class:`NetConfig`, :class:`LossConfig`, :class:`OptimConfig`.
        amp_dtype: Autocast dtype of the forward passes (e.g. ``torch.bfloat16``), or None for fp32.
    """
    def __init__(self, backbone: torch.nn.Module, num_classes: int, embedding_size: int = 512, *,
                 net: Optional[NetConfig] = None, loss: Optional[LossConfig] = None,
                 optim: Optional[OptimConfig] = None, amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.net_config = net or NetConfig()
        self.loss_config = loss or LossConfig()
        self.optim_config = optim or OptimConfig()
        self.amp_dtype = amp_dtype
        self.backbone = backbone
        self.embedding = Sequential(BatchNorm1d(backbone.out_features),
                                    Linear(backbone.out_features, embedding_size))
        self.net = CorrelationNet(embedding_size, num_classes, num_layers=self.net_config.num_layers,
                                  heads=self.net_config.heads, dropout=self.net_config.dropout)
        self.generator = HardNegativeGenerator(self.loss_config.alpha)
        self.classifier = Linear(embedding_size, num_classes)

        opt = self.optim_config
        self.metric_optimizer = torch.optim.AdamW([
            {"params": self.backbone.parameters(), "lr": opt.metric_lr},
            {"params": self.embedding.parameters(), "lr": opt.metric_lr * opt.embedding_lr_ratio},
        ], weight_decay=opt.weight_decay, fused=True)
        self.net_optimizer = torch.optim.AdamW(self.net.parameters(), lr=opt.net_lr,
                                               weight_decay=opt.weight_decay, fused=True)
        self.classifier_optimizer = torch.optim.AdamW(
            self.classifier.parameters(), lr=opt.classifier_lr,
            weight_decay=opt.classifier_weight_decay, fused=True)
        self.metric_scheduler = torch.optim.lr_scheduler.StepLR(
            self.metric_optimizer, step_size=opt.metric_lr_step, gamma=opt.metric_lr_gamma)
        self.net_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.net_optimizer, T_max=opt.epochs)

        self.epoch = 0
        self.mean_metric_loss = INITIAL_MEAN_LOSS
        self.mean_generator_loss = INITIAL_MEAN_LOSS
        self._metric_losses: List[float] = []
        self._generator_losses: List[float] = []

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    @property
    def backbone_frozen(self) -> bool:
        """True during the warm-up epochs, when only the embedding head learns."""
        return self.epoch < self.optim_config.warmup_epochs

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings :math:`\\mathbf{z}` (not normalised) of a batch of images."""
        with self._autocast():
            with torch.set_grad_enabled(torch.is_grad_enabled() and not
                                        (self.training and self.backbone_frozen)):
                features = self.backbone(images)
            return self.embedding(features).float()

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Evaluation embeddings: eval mode, no gradients; the previous mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return self(images.to(self.device, non_blocking=True))
        finally:
            self.train(was_training)

    def _correlate(self, embeddings: Tensor, labels: Tensor, detach_fusion: bool):
        """Node logits and dense fusion weights (N, N, D) of the batch graph of `embeddings`."""
        graph = build_batch_graph(embeddings, labels, undirected=True)
        with self._autocast():
            node_logits, fusion = self.net(graph.x, graph.edge_index, graph.edge_attr,
                                           graph.neg_mask, undirected=True,
                                           detach_fusion=detach_fusion)
        fusion = to_dense_edges(fusion.float(), graph.edge_index, embeddings.size(0),
                                undirected=True)
        return node_logits.float(), fusion

    @property
    def hardness(self) -> float:
        r"""The current hardness factor :math:`h = \exp(-\alpha / \bar{J}_m)` of synthesis."""
        return hardness_from_loss(self.generator.alpha, self.mean_metric_loss)

    @property
    def synthetic_weight(self) -> float:
        """The weight :math:`1 - \\exp(-\\beta / \\bar{J}_{gen})` of :math:`J_{syn}`."""
        return 1.0 - math.exp(-self.loss_config.beta / self.mean_generator_loss)

    def training_step(self, images: Tensor, labels: Tensor) -> Dict[str, float]:
        """One GCA-HNG iteration: metric, classifier and generator updates (SPEC.md §5).

        Args:
            images: A class-balanced batch (every class exactly K >= 2 times).
            labels: Its labels, (N,).

        Returns:
            The losses of the iteration as floats.

        Raises:
            NonFiniteLossError: Before any update that would apply a NaN or infinite loss.
        """
        self.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        embeddings = self(images)
        logs = self.metric_update(embeddings, labels)
        logs.update(self.classifier_update(embeddings.detach(), labels))
        if self.loss_config.synthesis:
            logs.update(self.generator_update(embeddings.detach(), labels))
        self._metric_losses.append(max(logs["J_m"], 1e-6))
        if "J_gen" in logs:
            self._generator_losses.append(max(logs["J_gen"], 1e-6))
        return logs

    def metric_update(self, embeddings: Tensor, labels: Tensor) -> Dict[str, float]:
        """Updates backbone, embedding head and correlation net with
        :math:`J_{metric} = J_m + w J_{syn} + J_{gce}` (fusion weights detached)."""
        cfg = self.loss_config
        j_m = npair_loss(embeddings, labels, cfg.l2_reg)
        node_logits, fusion = self._correlate(embeddings, labels, detach_fusion=True)
        j_gce = F.cross_entropy(node_logits, labels)
        j_metric = j_m + j_gce
        logs = {"J_m": j_m, "J_gce": j_gce}
        if cfg.synthesis:
            synthetic, synthetic_labels, anchor_index = self.generator(
                embeddings, labels, fusion, self.mean_metric_loss)
            j_syn = synthetic_npair_loss(embeddings, labels, synthetic, synthetic_labels,
                                         anchor_index, cfg.l2_reg)
            j_metric = j_metric + self.synthetic_weight * j_syn
            logs["J_syn"] = j_syn
        logs["J_metric"] = j_metric
        self._update(j_metric, "J_metric", [self.metric_optimizer, self.net_optimizer],
                    clip=[self.backbone, self.embedding, self.net])
        return {name: value.item() for name, value in logs.items()}

    def classifier_update(self, embeddings: Tensor, labels: Tensor) -> Dict[str, float]:
        """Updates the softmax classifier alone: :math:`J_{cls} = 10\\,\\mathrm{CE}(W_s z, y)`."""
        j_cls = self.loss_config.classifier_scale * F.cross_entropy(
            self.classifier(embeddings.detach()), labels)
        self._update(j_cls, "J_cls", [self.classifier_optimizer], clip=[])
        return {"J_cls": j_cls.item()}

    def generator_update(self, embeddings: Tensor, labels: Tensor) -> Dict[str, float]:
        """Updates the correlation net alone with
        :math:`J_{gen} = \\tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div})`."""
        cfg = self.loss_config
        embeddings = embeddings.detach()
        _, fusion = self._correlate(embeddings, labels, detach_fusion=False)
        synthetic, synthetic_labels, anchor_index = self.generator(
            embeddings, labels, fusion, self.mean_metric_loss)
        j_ce = synthetic_class_loss(synthetic, synthetic_labels, self._frozen_classifier,
                                    cfg.generator_ce_scale)
        num_classes = synthetic.size(0) // embeddings.size(0) + 1
        j_sim = similarity_loss(embeddings, synthetic, anchor_index, num_classes)
        j_div = diversity_loss(fusion)
        j_gen = 0.5 * (j_ce + cfg.w_sim * j_sim + cfg.w_div * j_div)
        self._update(j_gen, "J_gen", [self.net_optimizer], clip=[self.net])
        return {"J_gen": j_gen.item(), "J_ce": j_ce.item(), "J_sim": j_sim.item(),
                "J_div": j_div.item()}

    def _frozen_classifier(self, x: Tensor) -> Tensor:
        """The softmax classifier as a fixed function: the generator update must not touch it."""
        return F.linear(x, self.classifier.weight.detach(), self.classifier.bias.detach())

    def _update(self, loss: Tensor, name: str, optimizers: List[torch.optim.Optimizer],
               clip: List[torch.nn.Module]):
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{name} became {loss.item()} at epoch {self.epoch + 1}, iteration "
                f"{len(self._metric_losses) + 1}: no update was applied; lower the learning rates "
                "or check the data")
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipped = [p for module in clip for p in module.parameters() if p.grad is not None]
        if clipped:  # empty while the backbone is frozen and nothing else is clipped
            torch.nn.utils.clip_grad_value_(clipped, self.optim_config.grad_clip)
        for optimizer in optimizers:
            optimizer.step()

    def end_epoch(self):
        """Rolls the running means :math:`\\bar{J}_m`, :math:`\\bar{J}_{gen}` over the epoch just
        ended, steps the learning-rate schedules, and advances :attr:`epoch`."""
        if self._metric_losses:
            self.mean_metric_loss = sum(self._metric_losses) / len(self._metric_losses)
        if self._generator_losses:
            self.mean_generator_loss = sum(self._generator_losses) / len(self._generator_losses)
        self._metric_losses.clear()
        self._generator_losses.clear()
        self.metric_scheduler.step()
        self.net_scheduler.step()
        self.epoch += 1

    def training_state_dict(self) -> Dict:
        """Everything beyond :meth:`state_dict` that a resumed run needs."""
        return {
            "epoch": self.epoch,
            "mean_metric_loss": self.mean_metric_loss,
            "mean_generator_loss": self.mean_generator_loss,
            "metric_losses": list(self._metric_losses),
            "generator_losses": list(self._generator_losses),
            "optimizers": {name: getattr(self, name).state_dict() for name in self._OPTIMIZERS},
            "schedulers": {name: getattr(self, name).state_dict() for name in self._SCHEDULERS},
        }

    def load_training_state_dict(self, state: Dict):
        self.epoch = state["epoch"]
        self.mean_metric_loss = state["mean_metric_loss"]
        self.mean_generator_loss = state["mean_generator_loss"]
        self._metric_losses[:] = state["metric_losses"]
        self._generator_losses[:] = state["generator_losses"]
        for name in self._OPTIMIZERS:
            getattr(self, name).load_state_dict(state["optimizers"][name])
        for name in self._SCHEDULERS:
            getattr(self, name).load_state_dict(state["schedulers"][name])

    _OPTIMIZERS = ("metric_optimizer", "net_optimizer", "classifier_optimizer")
    _SCHEDULERS = ("metric_scheduler", "net_scheduler")
