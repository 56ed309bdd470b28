r"""GCA-HNG's hard-negative generator in a pytorch-metric-learning (PML) training loop.

:class:`GCANegativeGenerator` is a front-end on :class:`~gca_pyg.generator.HardNegativeGenerator`
(the generator the built-in trainer uses, called the same way): it turns a class-balanced batch
``(embeddings, labels)`` into synthetic hard negatives in PML's reference form, with the pairs
that use them as negatives of their own anchors only, so any PML loss that takes
``indices_tuple`` and ``ref_emb`` can use them::

    from pytorch_metric_learning.losses import TripletMarginLoss

    loss_fn = TripletMarginLoss(margin=0.1)
    generator = GCANegativeGenerator(embedding_size=64, num_classes=100, alpha=0.1)
    generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-4)

    for epoch in range(epochs):
        losses = []
        for images, labels in loader:                     # C classes x K >= 2 images each
            embeddings = model(images)
            loss = loss_fn(embeddings, labels)
            synthetic = loss_fn(embeddings, labels, *generator(embeddings, labels))
            optimizer.zero_grad()
            (loss + generator.synthetic_weight * synthetic).backward()
            optimizer.step()                              # your model only

            generator_optimizer.zero_grad()
            generator.loss(embeddings, labels).backward()  # embeddings are detached inside
            generator_optimizer.step()                    # the generator only
            losses.append(loss.item())
        generator.update(sum(losses) / len(losses))       # the hardness schedule, once per epoch

The split of the updates:

* **Your optimiser** updates your model with your PML loss. Gradients flow through the synthetic
  negatives back into the real embeddings they are made of, never into the generator: its fusion
  weights are computed without autograd there.
* **The generator's optimiser** updates the generator's parameters (its
  :class:`~gca_pyg.nn.CorrelationNet` and a softmax classifier) with
  :meth:`GCANegativeGenerator.loss`, which detaches the embeddings: it never touches your model.

The synthetic negatives depend on pytorch-metric-learning only through the call convention; the
``pml`` extra (``pip install "gca-pyg[pml]"``) installs it for ``examples/pml_triplet.py``.
"""

import math
from typing import Any

import torch
from torch import Tensor

from gca_pyg.generator import INITIAL_MEAN_LOSS, HardNegativeGenerator
from gca_pyg.graph import BatchGraph
from gca_pyg.losses.pml import SyntheticReferences, synthetic_references

__all__ = ["GCANegativeGenerator", "SyntheticReferences", "INITIAL_MEAN_LOSS"]


class GCANegativeGenerator(torch.nn.Module):
    r"""Synthetic hard negatives of GCA-HNG (`"Globally Correlation-Aware Hard Negative Generation"
    <https://arxiv.org/abs/2411.13145>`_, IJCV 2025) for pytorch-metric-learning losses: a thin
    front-end on :class:`~gca_pyg.generator.HardNegativeGenerator` (:attr:`generator`), the
    generator that :class:`~gca_pyg.model.GCAHNG` trains with.

    For a class-balanced batch, every anchor :math:`i` gets one synthetic negative per other class
    :math:`c` (see :class:`~gca_pyg.generator.HardNegativeGenerator`), at the hardness
    :math:`h = \exp(-\alpha / \bar{J})` set by the mean loss :math:`\bar{J}` of your model over
    the last epoch (:meth:`update`): as it falls, :math:`h \to 0` and the negatives move in to the
    positive's distance. It is a negative for the anchor it was made for, and only that: the
    :class:`~gca_pyg.losses.pml.SyntheticReferences` it comes in pair every anchor with its real
    positives and its own synthetic negatives, as GCA-HNG's :math:`J_{syn}` does. (Left to PML's
    label matching, a synthetic sample that stands for class :math:`c` but lies near an anchor of
    another class would also be a positive for the anchors of :math:`c`, pulling them towards that
    other class; ``examples/pml_triplet.py --label-matching`` measures what that costs.)

    The generator's own loss (:meth:`loss`, on detached embeddings) is

    .. math::
        J = \tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div}) + J_{gce} + J_{cls},

    :math:`J_{ce}` the softmax classifier's cross-entropy on the synthetic negatives (classifier
    frozen), :math:`J_{sim}` their cosine distance to their anchors, :math:`J_{div}` the diversity
    of the fusion weights, :math:`J_{gce}` the net's node classification, :math:`J_{cls}` the
    classifier's own training on the real embeddings.

    It loads the state dict of a :class:`~gca_pyg.generator.HardNegativeGenerator` as it is (e.g.
    ``model.generator`` of a trained :class:`~gca_pyg.model.GCAHNG`).

    Args:
        embedding_size (int): Size :math:`D` of the embeddings.
        num_classes (int): Number of training classes; labels must be ``0..num_classes-1``.
        **kwargs: ``num_layers, heads, dropout, edge_attention, alpha, beta, w_sim, w_div,
            generator_ce_scale, classifier_scale`` as in
            :class:`~gca_pyg.generator.HardNegativeGenerator`; choose ``alpha`` on the scale of
            your loss (:math:`h = e^{-1}` when :math:`\bar{J} = \alpha`; the default 5.0 suits
            GCA-HNG's N-pair loss).

    Shapes:
        - **input:** embeddings :math:`(N, D)`, labels :math:`(N,)`, every class exactly
          :math:`K \ge 2` times
        - **output:** :class:`~gca_pyg.losses.pml.SyntheticReferences`: :math:`N (K-1)` positive
          and :math:`N (C-1)` negative pairs over :math:`N + N (C-1)` references of size
          :math:`D`
    """

    def __init__(self, embedding_size: int, num_classes: int, *args, **kwargs: Any):
        super().__init__()
        self.generator = HardNegativeGenerator(embedding_size, num_classes, *args, **kwargs)
        self._register_load_state_dict_pre_hook(self._generator_keys)

    @property
    def embedding_size(self) -> int:
        return self.generator.embedding_size

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @property
    def hardness(self) -> float:
        """The generator's hardness :math:`h` (see :attr:`HardNegativeGenerator.hardness
        <gca_pyg.generator.HardNegativeGenerator.hardness>`)."""
        return self.generator.hardness

    @property
    def synthetic_weight(self) -> float:
        """The weight :math:`w` of your loss's synthetic term (see
        :attr:`HardNegativeGenerator.synthetic_weight
        <gca_pyg.generator.HardNegativeGenerator.synthetic_weight>`)."""
        return self.generator.synthetic_weight

    def forward(self, embeddings: Tensor, labels: Tensor) -> SyntheticReferences:
        """The batch's synthetic negatives as ``indices_tuple, ref_emb, ref_labels`` of a PML
        loss: ``loss_fn(embeddings, labels, *generator(embeddings, labels))``.

        Differentiable in `embeddings`; the generator's parameters get no gradient from them.

        Raises:
            ValueError: If the shapes, the labels or the class balance of the batch are wrong.
        """
        graph = self._checked_graph(embeddings, labels)
        negatives = self.generator(embeddings, graph).negatives
        return synthetic_references(embeddings, negatives, graph.layout, graph.classes)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The generator's loss on a batch (the embeddings are detached), for its own optimiser.

        Its :math:`J_{gen}` part also enters the running mean behind :attr:`synthetic_weight`.
        """
        graph = self._checked_graph(embeddings, labels)
        losses = self.generator.generator_loss(embeddings, graph, node_loss=True)
        self.generator.record(generator_loss=losses["J_gen"].item())
        j_cls = self.generator.classifier_loss(embeddings, labels)["J_cls"]
        return losses["J_gen"] + losses["J_gce"] + j_cls

    @torch.no_grad()
    def update(self, mean_metric_loss: float):
        r"""Ends an epoch: sets :math:`\bar{J}` (your model's mean loss over the epoch) for the
        hardness, and rolls :math:`\bar{J}_{gen}` over the :meth:`loss` calls since the last update.

        Raises:
            ValueError: If `mean_metric_loss` is not a positive finite number.
        """
        mean_metric_loss = float(mean_metric_loss)
        if not (math.isfinite(mean_metric_loss) and mean_metric_loss > 0):
            raise ValueError(
                f"update() needs the mean loss of your model over the epoch, a "
                f"positive finite number; got {mean_metric_loss}"
            )
        self.generator.end_epoch(mean_metric_loss)

    @staticmethod
    def _generator_keys(state_dict, prefix, *args):
        """Load hook: a :class:`~gca_pyg.generator.HardNegativeGenerator`'s keys (and those of
        gca_pyg 0.2.0's front-end, a subclass of it) under ``generator.``."""
        inner = prefix + "generator."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)

    def _checked_graph(self, embeddings: Tensor, labels: Tensor) -> BatchGraph:
        """The complete batch graph of one process, after checking the batch."""
        if embeddings.dim() != 2 or embeddings.size(1) != self.generator.embedding_size:
            raise ValueError(
                f"GCANegativeGenerator was built for embeddings of shape "
                f"[N, {self.generator.embedding_size}], got {tuple(embeddings.shape)}; pass "
                "embedding_size=D of your model"
            )
        if labels.dim() != 1 or labels.numel() != embeddings.size(0):
            raise ValueError(
                f"expected one label per embedding ({embeddings.size(0)}), got labels "
                f"of shape {tuple(labels.shape)}"
            )
        if labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= self.generator.num_classes
        ):
            raise ValueError(
                f"labels must be training class ids in 0..{self.generator.num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}; pass num_classes=the "
                "number of training classes, or map the labels to 0..C-1"
            )
        return BatchGraph.build(labels)
