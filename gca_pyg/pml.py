r"""GCA-HNG's hard-negative generator in a pytorch-metric-learning (PML) training loop.

:class:`GCANegativeGenerator` owns the correlation net and the synthesis of GCA-HNG, and turns a
class-balanced batch ``(embeddings, labels)`` into synthetic hard negatives in PML's reference form,
so any PML loss can use them::

    from pytorch_metric_learning.losses import TripletMarginLoss

    loss_fn = TripletMarginLoss(margin=0.1)
    generator = GCANegativeGenerator(embedding_size=64, num_classes=100, alpha=0.1)
    generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-4)

    for epoch in range(epochs):
        losses = []
        for images, labels in loader:                     # C classes x K >= 2 images each
            embeddings = model(images)
            loss = loss_fn(embeddings, labels)
            negatives, negative_labels = generator(embeddings, labels)
            synthetic = loss_fn(embeddings, labels, ref_emb=negatives, ref_labels=negative_labels)
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

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.generator import hardness_from_loss, synthesize_batch
from gca_pyg.graph import build_batch_graph, to_dense_edges
from gca_pyg.losses import diversity_loss, similarity_loss, synthetic_class_loss
from gca_pyg.nn import CorrelationNet

__all__ = ["GCANegativeGenerator"]

#: The running mean losses before the first :meth:`GCANegativeGenerator.update`: hardness ≈ 1 (the
#: synthetic negatives stay on the real ones) and a synthetic weight ≈ 0.
INITIAL_MEAN_LOSS = 1e6


class GCANegativeGenerator(torch.nn.Module):
    r"""Synthetic hard negatives of GCA-HNG (`"Globally Correlation-Aware Hard Negative Generation"
    <https://arxiv.org/abs/2411.13145>`_, IJCV 2025) for pytorch-metric-learning losses.

    For a class-balanced batch, a :class:`~gca_pyg.nn.CorrelationNet` on its correlation graph
    gives per-channel fusion weights :math:`\boldsymbol{\lambda}_{ij}`, and every anchor :math:`i`
    gets one synthetic negative per other class :math:`c`
    (:func:`~gca_pyg.generator.synthesize_batch`),

    .. math::
        \tilde{\mathbf{n}}_{i,c} = \mathbf{a}_i + (\mathbf{n} - \mathbf{a}_i) \odot
        \frac{d^+ + (d^- - d^+)\,\boldsymbol{\lambda}_{i n}\,h}{d^-},
        \qquad h = \exp(-\alpha / \bar{J}),

    merged over the K samples :math:`\mathbf{n}` of class :math:`c`. :math:`\bar{J}` is the mean
    loss of your model over the last epoch (:meth:`update`): as it falls, :math:`h \to 0` and the
    negatives move in to the positive's distance. Each synthetic negative carries the label of the
    class it stands for (the generator's classifier loss keeps it recognisable as that class): in a
    PML loss with ``ref_emb``, it is a negative for every anchor of another class — the hardest for
    the anchor it was made for — and a positive for the anchors of its own class.

    The generator's own loss (:meth:`loss`, on detached embeddings) is

    .. math::
        J = \tfrac12 (J_{ce} + w_{sim} J_{sim} + w_{div} J_{div}) + J_{gce} + J_{cls},

    :math:`J_{ce}` the softmax classifier's cross-entropy on the synthetic negatives (classifier
    frozen), :math:`J_{sim}` their cosine distance to their anchors, :math:`J_{div}` the diversity
    of the fusion weights, :math:`J_{gce}` the net's node classification, :math:`J_{cls}` the
    classifier's own training on the real embeddings.

    Args:
        embedding_size (int): Size :math:`D` of the embeddings.
        num_classes (int): Number of training classes; labels must be ``0..num_classes-1``.
        num_layers (int, optional): :class:`~gca_pyg.nn.EdgeNodeConv` layers. (default: :obj:`2`)
        heads (int, optional): Attention heads per layer. (default: :obj:`4`)
        dropout (float, optional): Dropout of the edge attention. (default: :obj:`0.1`)
        alpha (float, optional): :math:`\alpha` of the hardness; choose it on the scale of your
            loss (:math:`h = e^{-1}` when :math:`\bar{J} = \alpha`). (default: :obj:`5.0`, for the
            N-pair loss of GCA-HNG)
        beta (float, optional): :math:`\beta` of :attr:`synthetic_weight`. (default: :obj:`20.0`)
        w_sim (float, optional): Weight of :math:`J_{sim}`. (default: :obj:`20.0`)
        w_div (float, optional): Weight of :math:`J_{div}`. (default: :obj:`60.0`)
        generator_ce_scale (float, optional): Scale of :math:`J_{ce}`. (default: :obj:`20.0`)
        classifier_scale (float, optional): Scale of :math:`J_{cls}`. (default: :obj:`10.0`)

    Shapes:
        - **input:** embeddings :math:`(N, D)`, labels :math:`(N,)`, every class exactly
          :math:`K \ge 2` times
        - **output:** synthetic negatives :math:`(N (C-1), D)` and their labels
          :math:`(N (C-1),)`, grouped by anchor
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        num_layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        *,
        alpha: float = 5.0,
        beta: float = 20.0,
        w_sim: float = 20.0,
        w_div: float = 60.0,
        generator_ce_scale: float = 20.0,
        classifier_scale: float = 10.0,
    ):
        super().__init__()
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.alpha, self.beta = alpha, beta
        self.w_sim, self.w_div = w_sim, w_div
        self.generator_ce_scale, self.classifier_scale = generator_ce_scale, classifier_scale
        self.net = CorrelationNet(
            embedding_size, num_classes, num_layers=num_layers, heads=heads, dropout=dropout
        )
        self.classifier = torch.nn.Linear(embedding_size, num_classes)
        # Buffers, so that a state_dict resumes the schedule too.
        self.register_buffer("mean_metric_loss", torch.tensor(INITIAL_MEAN_LOSS))
        self.register_buffer("mean_generator_loss", torch.tensor(INITIAL_MEAN_LOSS))
        self.register_buffer("generator_loss_sum", torch.tensor(0.0))
        self.register_buffer("generator_loss_count", torch.tensor(0))

    @property
    def hardness(self) -> float:
        r"""The hardness :math:`h = \exp(-\alpha / \bar{J})` of the synthesis."""
        return hardness_from_loss(self.alpha, float(self.mean_metric_loss))

    @property
    def synthetic_weight(self) -> float:
        r"""A suggested weight :math:`1 - \exp(-\beta / \bar{J}_{gen})` of the loss on synthetic
        negatives: about 0 until the generator's mean loss :math:`\bar{J}_{gen}` is known."""
        return 1.0 - math.exp(-self.beta / float(self.mean_generator_loss))

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Synthetic negatives and their labels: ``ref_emb, ref_labels`` for a PML loss.

        Differentiable in `embeddings`; the generator's parameters get no gradient from them.

        Raises:
            ValueError: If the shapes, the labels or the class balance of the batch are wrong.
        """
        self._check(embeddings, labels)
        with torch.no_grad():
            _, fusion = self._correlate(embeddings.detach(), labels)
        synthetic, synthetic_labels, _ = synthesize_batch(embeddings, labels, fusion, self.hardness)
        return synthetic, synthetic_labels

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The generator's loss on a batch (the embeddings are detached), for its own optimiser.

        Its :math:`J_{gen}` part also enters the running mean behind :attr:`synthetic_weight`.
        """
        self._check(embeddings, labels)
        embeddings = embeddings.detach()
        node_logits, fusion = self._correlate(embeddings, labels)
        synthetic, synthetic_labels, anchor_index = synthesize_batch(
            embeddings, labels, fusion, self.hardness
        )
        j_ce = synthetic_class_loss(
            synthetic, synthetic_labels, self._frozen_classifier, self.generator_ce_scale
        )
        classes_in_batch = synthetic.size(0) // embeddings.size(0) + 1
        j_sim = similarity_loss(embeddings, synthetic, anchor_index, classes_in_batch)
        j_gen = 0.5 * (j_ce + self.w_sim * j_sim + self.w_div * diversity_loss(fusion))
        j_gce = F.cross_entropy(node_logits, labels)
        j_cls = self.classifier_scale * F.cross_entropy(self.classifier(embeddings), labels)
        self.generator_loss_sum += j_gen.detach().clamp_min(1e-6)
        self.generator_loss_count += 1
        return j_gen + j_gce + j_cls

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
        self.mean_metric_loss.fill_(mean_metric_loss)
        if int(self.generator_loss_count) > 0:
            self.mean_generator_loss.copy_(self.generator_loss_sum / self.generator_loss_count)
        self.generator_loss_sum.zero_()
        self.generator_loss_count.zero_()

    def _correlate(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Node logits and dense fusion weights :math:`(N, N, D)` of the batch graph."""
        graph = build_batch_graph(embeddings, labels, undirected=True)
        node_logits, fusion = self.net(
            graph.x, graph.edge_index, graph.edge_attr, graph.neg_mask, undirected=True
        )
        return node_logits, to_dense_edges(
            fusion, graph.edge_index, embeddings.size(0), undirected=True
        )

    def _frozen_classifier(self, x: Tensor) -> Tensor:
        """The classifier as a fixed function: :math:`J_{ce}` must not train it."""
        return F.linear(x, self.classifier.weight.detach(), self.classifier.bias.detach())

    def _check(self, embeddings: Tensor, labels: Tensor):
        if embeddings.dim() != 2 or embeddings.size(1) != self.embedding_size:
            raise ValueError(
                f"GCANegativeGenerator was built for embeddings of shape "
                f"[N, {self.embedding_size}], got {tuple(embeddings.shape)}; pass "
                "embedding_size=D of your model"
            )
        if labels.dim() != 1 or labels.numel() != embeddings.size(0):
            raise ValueError(
                f"expected one label per embedding ({embeddings.size(0)}), got labels "
                f"of shape {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be training class ids in 0..{self.num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}; pass num_classes=the "
                "number of training classes, or map the labels to 0..C-1"
            )

    def extra_repr(self) -> str:
        return f"{self.embedding_size}, num_classes={self.num_classes}, alpha={self.alpha}"
