"""The alternating optimisation of GCA-HNG: three optimisers, two schedules, running means.

:class:`AlternatingTrainer` is to :class:`~gca_pyg.model.GCAHNG` what a Lightning module's
``configure_optimizers`` and ``training_step`` are to its networks: it owns the optimisers, the
learning-rate schedules, the running means :math:`\\bar{J}_m` and :math:`\\bar{J}_{gen}` that set
the
hardness and the weight of :math:`J_{syn}`, and the random merge coefficients of synthesis; it runs
the metric, classifier and generator updates of one iteration; and its :meth:`state_dict` is what a
checkpoint needs besides the model's weights. It works the same in one process and under
``torchrun`` (give it the :class:`~gca_pyg.distributed.Context`).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gca_pyg.distributed import (
    Context,
    average_buffers,
    average_gradients,
    broadcast_parameters,
    broadcast_tensor,
    gather_rows,
)
from gca_pyg.errors import NonFiniteLossError
from gca_pyg.generator import draw_mix, hardness_from_loss
from gca_pyg.graph import EdgeShard, knn_pairs, shard_pairs, sparse_shard
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.model import GCAHNG

__all__ = [
    "OptimConfig",
    "AlternatingTrainer",
    "adamw_options",
    "sync_batch_norm",
    "INITIAL_MEAN_LOSS",
]

#: J̄_m and J̄_gen before the first epoch has ended: hardness ≈ 1 and J_syn's weight ≈ 0.
INITIAL_MEAN_LOSS = 1e6


@dataclass
class OptimConfig:
    """Optimisers and schedules (ResNet-50 CUB values as defaults; docs/method.md,
    "Optimisation")."""

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


def adamw_options(device: torch.device) -> dict[str, bool]:
    """The fastest AdamW this torch supports on `device`: fused kernels on CUDA and the CPU (torch
    2.4 and later), the default elsewhere."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def sync_batch_norm(model: GCAHNG, context: Context) -> bool:
    """Turns the backbone's training BatchNorm layers into ``SyncBatchNorm`` when several CUDA
    processes train (their batch statistics then cover the whole batch); frozen ones (the backbone's
    ``frozen_bn``) stay as they are, and nothing changes on the CPU, which has no SyncBatchNorm.

    Returns:
        Whether it converted the backbone.
    """
    if context.world_size == 1 or context.device.type != "cuda":
        return False
    if getattr(model.backbone, "frozen_bn", False):
        return False
    model.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    return True


class AlternatingTrainer:
    r"""Runs GCA-HNG's three alternating updates on a :class:`~gca_pyg.model.GCAHNG`.

    Each :meth:`training_step` derives the batch's class layout and this process's share of the
    graph's pairs once (the complete graph, or with ``graph.neighbors`` the sparse graph of the
    step's embeddings, which both updates then share), then

    1. *metric update* — backbone, embedding head and correlation net with
       :math:`J_m + w J_{syn} + J_{gce}`, :math:`w = 1 - \exp(-\beta / \bar{J}_{gen})`;
    2. *classifier update* — the softmax classifier with :math:`J_{cls}`;
    3. *generator update* — the correlation net with :math:`J_{gen}`;

    each with its own AdamW, gradients clipped by value. Under ``torchrun`` the gradients are
    averaged over the processes before clipping, so every process applies the same update; a
    backbone's BatchNorm layers that train take their batch statistics from this process's images
    (the CPU has no SyncBatchNorm; on CUDA they become ``SyncBatchNorm``, :func:`sync_batch_norm`)
    and their running statistics are averaged after every step.
    :meth:`end_epoch` rolls the running means and steps the schedules (StepLR on the metric
    learning rates, cosine on the net's).

    Args:
        model: The networks.
        config: :class:`OptimConfig`.
        context: Where this process stands (:func:`gca_pyg.distributed.setup`); one process if
            omitted.
        seed: Seed of the merge coefficients of synthesis (the same on every process).
    """

    def __init__(
        self,
        model: GCAHNG,
        config: Optional[OptimConfig] = None,
        *,
        context: Optional[Context] = None,
        seed: int = 0,
    ):
        self.model = model
        self.config = config or OptimConfig()
        self.context = context or Context(device=model.device)
        self.group = self.context.group
        sync_batch_norm(model, self.context)
        broadcast_parameters(model, self.group)

        cfg, options = self.config, adamw_options(model.device)
        self.metric_optimizer = torch.optim.AdamW(
            [
                {"params": model.backbone.parameters(), "lr": cfg.metric_lr},
                {
                    "params": model.embedding.parameters(),
                    "lr": cfg.metric_lr * cfg.embedding_lr_ratio,
                },
            ],
            weight_decay=cfg.weight_decay,
            **options,
        )
        self.net_optimizer = torch.optim.AdamW(
            model.net.parameters(), lr=cfg.net_lr, weight_decay=cfg.weight_decay, **options
        )
        self.classifier_optimizer = torch.optim.AdamW(
            model.classifier.parameters(),
            lr=cfg.classifier_lr,
            weight_decay=cfg.classifier_weight_decay,
            **options,
        )
        self.metric_scheduler = torch.optim.lr_scheduler.StepLR(
            self.metric_optimizer, step_size=cfg.metric_lr_step, gamma=cfg.metric_lr_gamma
        )
        self.net_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.net_optimizer, T_max=cfg.epochs
        )

        self.epoch = 0
        self.mean_metric_loss = INITIAL_MEAN_LOSS
        self.mean_generator_loss = INITIAL_MEAN_LOSS
        self._metric_losses: list[float] = []
        self._generator_losses: list[float] = []
        self._epoch_sums: dict[str, float] = {}
        self.mix_generator = torch.Generator().manual_seed(seed)

    # -- schedules -----------------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """True during the warm-up epochs, when the backbone runs without gradients."""
        return self.epoch < self.config.warmup_epochs

    @property
    def hardness(self) -> float:
        r"""The hardness :math:`h = \exp(-\alpha / \bar{J}_m)` of synthesis."""
        return hardness_from_loss(self.model.loss_config.alpha, self.mean_metric_loss)

    @property
    def synthetic_weight(self) -> float:
        r"""The weight :math:`1 - \exp(-\beta / \bar{J}_{gen})` of :math:`J_{syn}`."""
        return 1.0 - math.exp(-self.model.loss_config.beta / self.mean_generator_loss)

    @property
    def learning_rates(self) -> dict[str, float]:
        return {
            "lr_metric": self.metric_optimizer.param_groups[0]["lr"],
            "lr_net": self.net_optimizer.param_groups[0]["lr"],
        }

    # -- one iteration -------------------------------------------------------------------------
    def prepare(
        self, labels: Tensor, embeddings: Optional[Tensor] = None
    ) -> tuple[Tensor, ClassLayout, EdgeShard]:
        """The labels of the whole batch, its class layout and this process's share of its pairs.

        With ``graph.neighbors`` set on the model, the pairs are those of the sparse graph of the
        batch's `embeddings` (:func:`~gca_pyg.graph.knn_pairs`), which must then be given."""
        labels = gather_rows(labels, self.group)
        layout = class_layout(labels)
        neighbors = self.model.graph_config.neighbors
        if neighbors is None:
            shard = shard_pairs(layout, self.context.rank, self.context.world_size)
        elif embeddings is None:
            raise ValueError(
                "prepare needs the batch's embeddings to build the sparse graph of graph.neighbors"
            )
        else:
            # Rank 0 searches, the others receive its pairs: every process splits the same graph.
            pairs = (
                knn_pairs(embeddings, labels, neighbors)
                if self.context.rank == 0
                else torch.empty(2, 0, dtype=torch.long, device=labels.device)
            )
            pairs = broadcast_tensor(pairs, self.group)
            shard = sparse_shard(layout, pairs, self.context.rank, self.context.world_size)
        return labels, layout, shard

    def training_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """One GCA-HNG iteration: metric, classifier and generator updates.

        Args:
            images: This process's share of a class-balanced batch (whole classes).
            labels: Its labels.

        Returns:
            The losses of the iteration (of the whole batch) as floats.

        Raises:
            NonFiniteLossError: Before any update that would apply a NaN or infinite loss.
        """
        model = self.model
        model.train()
        images = images.to(model.device, non_blocking=True)
        embeddings = model(images, freeze_backbone=self.backbone_frozen, group=self.group)
        labels, layout, shard = self.prepare(labels.to(model.device, non_blocking=True), embeddings)
        synthesis = model.loss_config.synthesis
        # Both draws come first, so the coefficients do not depend on what the updates draw.
        metric_mix, generator_mix = (
            draw_mix(layout.samples_per_class, self.mix_generator, model.device) for _ in range(2)
        )
        hardness = self.hardness

        losses = model.metric_loss(
            embeddings,
            labels,
            layout,
            shard,
            hardness=hardness,
            synthetic_weight=self.synthetic_weight,
            mix=metric_mix,
            group=self.group,
        )
        self._update(
            losses["J_metric"],
            "J_metric",
            [self.metric_optimizer, self.net_optimizer],
            clip=[model.backbone, model.embedding, model.net],
        )
        classifier_losses = model.classifier_loss(embeddings, labels)
        self._update(classifier_losses["J_cls"], "J_cls", [self.classifier_optimizer], clip=[])
        losses.update(classifier_losses)
        if synthesis:
            generator_losses = model.generator_loss(
                embeddings,
                labels,
                layout,
                shard,
                hardness=hardness,
                mix=generator_mix,
                group=self.group,
            )
            self._update(generator_losses["J_gen"], "J_gen", [self.net_optimizer], clip=[model.net])
            losses.update(generator_losses)
        # A backbone's BatchNorm sees only this process's images: keep one set of statistics.
        average_buffers(model.backbone, self.group)

        logs = {name: value.item() for name, value in losses.items()}
        self._metric_losses.append(max(logs["J_m"], 1e-6))
        if "J_gen" in logs:
            self._generator_losses.append(max(logs["J_gen"], 1e-6))
        for name, value in logs.items():
            self._epoch_sums[name] = self._epoch_sums.get(name, 0.0) + value
        return logs

    def _update(
        self,
        loss: Tensor,
        name: str,
        optimizers: list[torch.optim.Optimizer],
        clip: Iterable[torch.nn.Module],
    ):
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{name} became {loss.item()} at epoch {self.epoch + 1}, iteration "
                f"{len(self._metric_losses) + 1}: no update was applied; lower the learning rates "
                "or check the data"
            )
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [
            p
            for optimizer in optimizers
            for group in optimizer.param_groups
            for p in group["params"]
        ]
        average_gradients(parameters, self.group)
        clipped = [p for module in clip for p in module.parameters() if p.grad is not None]
        if clipped:  # empty while the backbone is frozen and nothing else is clipped
            torch.nn.utils.clip_grad_value_(clipped, self.config.grad_clip)
        for optimizer in optimizers:
            optimizer.step()

    # -- epochs and state ----------------------------------------------------------------------
    def end_epoch(self) -> dict[str, float]:
        """Rolls :math:`\\bar{J}_m`, :math:`\\bar{J}_{gen}` over the epoch just ended, steps the
        learning-rate schedules and advances :attr:`epoch`.

        Returns:
            The epoch's mean of every loss (over all its iterations, also across a resume).
        """
        steps = len(self._metric_losses)
        means = {name: total / steps for name, total in self._epoch_sums.items()} if steps else {}
        if self._metric_losses:
            self.mean_metric_loss = sum(self._metric_losses) / len(self._metric_losses)
        if self._generator_losses:
            self.mean_generator_loss = sum(self._generator_losses) / len(self._generator_losses)
        self._metric_losses.clear()
        self._generator_losses.clear()
        self._epoch_sums.clear()
        self.metric_scheduler.step()
        self.net_scheduler.step()
        self.epoch += 1
        return means

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model's :meth:`~torch.nn.Module.state_dict`."""
        return {
            "epoch": self.epoch,
            "mean_metric_loss": self.mean_metric_loss,
            "mean_generator_loss": self.mean_generator_loss,
            "metric_losses": list(self._metric_losses),
            "generator_losses": list(self._generator_losses),
            "epoch_sums": dict(self._epoch_sums),
            "mix_generator": self.mix_generator.get_state(),
            "optimizers": {name: getattr(self, name).state_dict() for name in self._OPTIMIZERS},
            "schedulers": {name: getattr(self, name).state_dict() for name in self._SCHEDULERS},
        }

    def load_state_dict(self, state: dict):
        self.epoch = state["epoch"]
        self.mean_metric_loss = state["mean_metric_loss"]
        self.mean_generator_loss = state["mean_generator_loss"]
        self._metric_losses[:] = state["metric_losses"]
        self._generator_losses[:] = state["generator_losses"]
        self._epoch_sums = dict(state["epoch_sums"])
        self.mix_generator.set_state(state["mix_generator"])
        for name in self._OPTIMIZERS:
            getattr(self, name).load_state_dict(state["optimizers"][name])
        for name in self._SCHEDULERS:
            getattr(self, name).load_state_dict(state["schedulers"][name])

    _OPTIMIZERS = ("metric_optimizer", "net_optimizer", "classifier_optimizer")
    _SCHEDULERS = ("metric_scheduler", "net_scheduler")
