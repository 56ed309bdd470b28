"""The alternating optimisation of GCA-HNG: three optimisers and their learning-rate schedules.

:class:`AlternatingTrainer` is to :class:`~gca_pyg.model.GCAHNG` what a Lightning module's
``configure_optimizers`` and ``training_step`` are to its networks: it owns the optimisers, the
learning-rate schedules and the random merge coefficients of synthesis; it builds each step's
:class:`~gca_pyg.graph.BatchGraph` and runs the metric, classifier and generator updates of one
iteration; and its :meth:`state_dict` is what a checkpoint needs besides the model's (whose
generator keeps the running means behind the hardness and the synthetic weight). It works the same
in one process and under ``torchrun``, over the model's process group.
"""

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor

from gca_pyg.distributed import (
    all_gather_rows,
    average_buffers,
    average_gradients,
    broadcast_parameters,
    rank_and_size,
)
from gca_pyg.errors import NonFiniteLossError
from gca_pyg.graph import BatchGraph
from gca_pyg.memory import EmbeddingMemory
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LR_POLICIES, OptimConfig
from gca_pyg.synthesis import draw_mix

__all__ = [
    "AlternatingTrainer",
    "adamw_options",
    "metric_lr_scheduler",
    "sync_batch_norm",
]

#: The factor per epoch of ``lr_policy: exp``, fixed in the authors' train.py.
EXP_LR_GAMMA = 0.9


def metric_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    r"""The schedule of the metric learning rates (backbone and embedding head), stepped once per
    epoch, as the authors' train.py builds it from ``SOLVER.LR_POLICY``. After epoch :math:`t`:

    - ``step``: :math:`\eta_0\,\gamma^{\lfloor t / s \rfloor}`, :math:`\gamma` =
      ``metric_lr_gamma``, :math:`s` = ``metric_lr_step``;
    - ``cos``: torch's :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` with period
      :math:`T` = ``metric_lr_step`` epochs (not the whole run), minimum 0:
      :math:`\tfrac12 \eta_0 (1 + \cos(\pi t / T))` for :math:`t \le T`; it rises again after;
    - ``exp``: :math:`\eta_0 \cdot 0.9^t` (the reference's fixed factor, not
      ``metric_lr_gamma``);
    - ``none``: :math:`\eta_0`.
    """
    policy = config.lr_policy
    schedulers = torch.optim.lr_scheduler
    if policy == "step":
        return schedulers.StepLR(
            optimizer, step_size=config.metric_lr_step, gamma=config.metric_lr_gamma
        )
    if policy == "cos":
        return schedulers.CosineAnnealingLR(optimizer, T_max=config.metric_lr_step, eta_min=0.0)
    if policy == "exp":
        return schedulers.ExponentialLR(optimizer, gamma=EXP_LR_GAMMA)
    if policy == "none":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"optim.lr_policy is {policy!r}; choose one of {', '.join(LR_POLICIES)}")


def adamw_options(device: torch.device) -> dict[str, bool]:
    """The fastest AdamW this torch supports on `device`: fused kernels on CUDA and the CPU (torch
    2.4 and later), the default elsewhere."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def sync_batch_norm(model: GCAHNG, world_size: int, device: torch.device) -> bool:
    """Turns the backbone's training BatchNorm layers into ``SyncBatchNorm`` when several
    (``world_size``) processes train on CUDA ``device`` (their batch statistics then cover the whole
    batch); frozen ones (the backbone's ``frozen_bn``) stay as they are, and nothing changes on the
    CPU, which has no SyncBatchNorm.

    Returns:
        Whether it converted the backbone.
    """
    if world_size == 1 or device.type != "cuda":
        return False
    if getattr(model.backbone, "frozen_bn", False):
        return False
    model.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    return True


class AlternatingTrainer:
    r"""Runs GCA-HNG's three alternating updates on a :class:`~gca_pyg.model.GCAHNG`.

    Each :meth:`training_step` builds the step's :class:`~gca_pyg.graph.BatchGraph` once (the
    complete graph, or with ``graph.neighbors`` the sparse graph of the step's embeddings, which
    both updates then share), then

    1. *metric update* — backbone, embedding head, correlation net and the metric loss's own
       parameters (Proxy-Anchor's proxies) with :math:`J_m + w J_{syn} + J_{gce}`,
       :math:`w = 1 - \exp(-\beta / \bar{J}_{gen})`;
    2. *classifier update* — the softmax classifier with :math:`J_{cls}`;
    3. *generator update* — the correlation net with :math:`J_{gen}`;

    each with its own AdamW, gradients clipped by value. Under ``torchrun`` (a model built with a
    process group) the gradients are averaged over the processes before clipping, so every process
    applies the same update; a backbone's BatchNorm layers that train take their batch statistics
    from this process's images (the CPU has no SyncBatchNorm; on CUDA they become
    ``SyncBatchNorm``, :func:`sync_batch_norm`) and their running statistics are averaged after
    every step. :meth:`end_epoch` rolls the generator's running means and steps the schedules
    (``optim.lr_policy`` on the metric learning rates, :func:`metric_lr_scheduler`; cosine over all
    epochs on the net's).

    With ``graph.memory: M`` the trainer keeps the last :math:`M` training embeddings
    (:attr:`memory`, a :class:`~gca_pyg.memory.EmbeddingMemory`): after ``graph.memory_start``
    epochs, each step's graph takes them as memory nodes and the step's embeddings are enqueued
    after its updates; the step's logs count the memory nodes (``memory_nodes``).

    Args:
        model: The networks (and, in :attr:`GCAHNG.process_group
            <gca_pyg.model.GCAHNG.process_group>`, the processes that train them).
        config: :class:`OptimConfig`.
        seed: Seed of the merge coefficients of synthesis (the same on every process).
        diagnostics: Log :meth:`GCAHNG.synthesis_diagnostics
            <gca_pyg.model.GCAHNG.synthesis_diagnostics>` with every step's losses
            (``train.diagnostics``).
    """

    def __init__(
        self,
        model: GCAHNG,
        config: Optional[OptimConfig] = None,
        *,
        seed: int = 0,
        diagnostics: bool = False,
    ):
        self.model = model
        self.diagnostics = diagnostics
        self.config = config or OptimConfig()
        self.process_group = model.process_group
        sync_batch_norm(model, rank_and_size(self.process_group)[1], model.device)
        broadcast_parameters(model, self.process_group)

        cfg, options = self.config, adamw_options(model.device)
        metric_groups = [
            {"params": model.backbone.parameters(), "lr": cfg.metric_lr},
            {"params": model.embedding.parameters(), "lr": cfg.metric_lr * cfg.embedding_lr_ratio},
        ]
        metric_loss_parameters = list(model.criterion.parameters())
        if metric_loss_parameters:  # Proxy-Anchor's proxies
            metric_groups.append(
                {"params": metric_loss_parameters, "lr": cfg.metric_lr * cfg.proxy_lr_ratio}
            )
        self.metric_optimizer = torch.optim.AdamW(
            metric_groups, weight_decay=cfg.weight_decay, **options
        )
        self.net_optimizer = torch.optim.AdamW(
            model.generator.net.parameters(),
            lr=cfg.net_lr,
            weight_decay=cfg.weight_decay,
            **options,
        )
        self.classifier_optimizer = torch.optim.AdamW(
            model.generator.classifier.parameters(),
            lr=cfg.classifier_lr,
            weight_decay=cfg.classifier_weight_decay,
            **options,
        )
        self.metric_scheduler = metric_lr_scheduler(self.metric_optimizer, cfg)
        self.net_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.net_optimizer, T_max=cfg.epochs
        )

        self.epoch = 0
        self._steps_in_epoch = 0
        self._epoch_sums: dict[str, float] = {}
        self.mix_rng = torch.Generator().manual_seed(seed)
        graph = model.graph_config
        self.memory = (
            EmbeddingMemory(
                graph.memory,
                model.generator.embedding_size,
                model.device,
                model.generator.classifier.weight.dtype,  # the embeddings' dtype
            )
            if graph.memory
            else None
        )

    # -- schedules -----------------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """True during the warm-up epochs, when the backbone runs without gradients."""
        return self.epoch < self.config.warmup_epochs

    @property
    def hardness(self) -> float:
        r"""The hardness :math:`h = \exp(-\alpha / \bar{J}_m)` of synthesis (the generator's)."""
        return self.model.generator.hardness

    @property
    def synthetic_weight(self) -> float:
        r"""The weight :math:`1 - \exp(-\beta / \bar{J}_{gen})` of :math:`J_{syn}` (the
        generator's)."""
        return self.model.generator.synthetic_weight

    @property
    def learning_rates(self) -> dict[str, float]:
        return {
            "lr_metric": self.metric_optimizer.param_groups[0]["lr"],
            "lr_net": self.net_optimizer.param_groups[0]["lr"],
        }

    # -- one iteration -------------------------------------------------------------------------
    @property
    def memory_active(self) -> bool:
        """Whether this epoch's steps read and fill the memory (``graph.memory_start``)."""
        return self.memory is not None and self.epoch >= self.model.graph_config.memory_start

    def batch_graph(self, labels: Tensor, embeddings: Optional[Tensor] = None) -> BatchGraph:
        """The step's :class:`~gca_pyg.graph.BatchGraph` from this process's `labels` (gathered
        from every process here) and the batch's `embeddings` (needed with ``graph.neighbors``),
        with the memory's contents as memory nodes where :attr:`memory_active`."""
        memory = self.memory.contents() if self.memory_active and len(self.memory) else None
        config = self.model.graph_config
        return BatchGraph.build(
            all_gather_rows(labels, self.process_group),
            embeddings,
            neighbors=config.neighbors,
            process_group=self.process_group,
            memory=memory,
            memory_neighbors=config.memory_neighbors,
        )

    def training_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """One GCA-HNG iteration: metric, classifier and generator updates.

        Args:
            images: This process's share of a class-balanced batch (whole classes).
            labels: Its labels.

        Returns:
            The losses of the iteration (of the whole batch) as floats, and with ``graph.memory``
            the number of memory nodes of its graph.

        Raises:
            NonFiniteLossError: Before any update that would apply a NaN or infinite loss.
        """
        model = self.model
        model.train()
        images = images.to(model.device, non_blocking=True)
        embeddings = model(images, freeze_backbone=self.backbone_frozen)
        graph = self.batch_graph(labels.to(model.device, non_blocking=True), embeddings)
        synthesis = model.loss_config.synthesis
        # Both draws come first, so the coefficients do not depend on what the updates draw.
        metric_mix, generator_mix = (
            draw_mix(graph.layout.samples_per_class, self.mix_rng, model.device) for _ in range(2)
        )

        losses = model.metric_loss(embeddings, graph, metric_mix, diagnostics=self.diagnostics)
        self._update(
            losses["J_metric"],
            "J_metric",
            [self.metric_optimizer, self.net_optimizer],
            clip=[model.backbone, model.embedding, model.generator.net, model.criterion],
        )
        classifier_losses = model.classifier_loss(embeddings, graph.labels)
        self._update(classifier_losses["J_cls"], "J_cls", [self.classifier_optimizer], clip=[])
        losses.update(classifier_losses)
        if synthesis:
            generator_losses = model.generator_loss(embeddings, graph, generator_mix)
            self._update(
                generator_losses["J_gen"], "J_gen", [self.net_optimizer], clip=[model.generator.net]
            )
            losses.update(generator_losses)
        # A backbone's BatchNorm sees only this process's images: keep one set of statistics.
        average_buffers(model.backbone, self.process_group)
        if self.memory_active:  # the whole batch, the same on every process
            self.memory.enqueue(embeddings.detach(), graph.labels)

        logs = {name: value.item() for name, value in losses.items()}
        if self.memory is not None:  # how many memory entries the step's graph took
            logs["memory_nodes"] = float(0 if graph.memory is None else graph.memory.num_nodes)
        model.generator.record(metric_loss=logs["J_m"], generator_loss=logs.get("J_gen"))
        self._steps_in_epoch += 1
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
                f"{self._steps_in_epoch + 1}: no update was applied; lower the learning rates "
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
        average_gradients(parameters, self.process_group)
        clipped = [p for module in clip for p in module.parameters() if p.grad is not None]
        # empty while the backbone is frozen and nothing else is clipped
        if clipped and self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(clipped, self.config.grad_clip)
        for optimizer in optimizers:
            optimizer.step()

    # -- epochs and state ----------------------------------------------------------------------
    def end_epoch(self) -> dict[str, float]:
        """Rolls the generator's :math:`\\bar{J}_m`, :math:`\\bar{J}_{gen}` over the epoch just
        ended, steps the learning-rate schedules and advances :attr:`epoch`.

        Returns:
            The epoch's mean of every loss (over all its iterations, also across a resume).
        """
        steps = self._steps_in_epoch
        means = {name: total / steps for name, total in self._epoch_sums.items()} if steps else {}
        self.model.generator.end_epoch()
        self._steps_in_epoch = 0
        self._epoch_sums.clear()
        self.metric_scheduler.step()
        self.net_scheduler.step()
        self.epoch += 1
        return means

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model's :meth:`~torch.nn.Module.state_dict`
        (which holds the generator's running means)."""
        return {
            "epoch": self.epoch,
            "steps_in_epoch": self._steps_in_epoch,
            "epoch_sums": dict(self._epoch_sums),
            "mix_generator": self.mix_rng.get_state(),
            "optimizers": {name: getattr(self, name).state_dict() for name in self._OPTIMIZERS},
            "schedulers": {name: getattr(self, name).state_dict() for name in self._SCHEDULERS},
            "memory": None if self.memory is None else self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict):
        self.epoch = state["epoch"]
        self._steps_in_epoch = state["steps_in_epoch"]
        self._epoch_sums = dict(state["epoch_sums"])
        self.mix_rng.set_state(state["mix_generator"])
        for name in self._OPTIMIZERS:
            getattr(self, name).load_state_dict(state["optimizers"][name])
        for name in self._SCHEDULERS:
            getattr(self, name).load_state_dict(state["schedulers"][name])
        saved_memory = state.get("memory")  # absent in checkpoints written before graph.memory
        if self.memory is not None:
            if saved_memory is None:
                self.memory.clear()
            else:
                self.memory.load_state_dict(saved_memory)
        elif saved_memory is not None:
            raise ValueError(
                f"the checkpoint's run kept a memory of {saved_memory['size']} embeddings "
                "(graph.memory) and this one keeps none: resume with the checkpoint's graph "
                "settings"
            )

    _OPTIMIZERS = ("metric_optimizer", "net_optimizer", "classifier_optimizer")
    _SCHEDULERS = ("metric_scheduler", "net_scheduler")
