r"""Any loss of pytorch-metric-learning (PML) as GCA-HNG's metric loss: ``loss.metric:
pml:<LossName>``, keyword arguments in ``loss.metric_kwargs``.

:math:`J_m` is the PML loss on the batch, ``loss_fn(embeddings, labels)``. :math:`J_{syn}` gives it
the synthetic negatives in PML's reference form (:func:`synthetic_references`): each is a
reference embedding paired as a negative with the anchor it was made for, and with nothing else;
each anchor's real classmates are its positive references. A synthetic negative stands for another
class yet lies near its anchor, inside the anchor's class region: left to PML's label matching it
would also be a positive for the anchors of the class it stands for, pulling them towards the
anchor's class (the pml front-end's example measures what that costs).

Losses that take no references (``ref_emb``: the proxy and classification losses, e.g.
``ProxyNCALoss``, ``ProxyAnchorLoss``, ``NormalizedSoftmaxLoss``) meet no sample but the proxies,
so there is no pairing to get wrong: their :math:`J_{syn}` is the loss on the synthetic negatives as
samples of the classes they stand for, ``loss_fn(negatives, their labels)``, which pushes each from
its anchor's class proxy and pulls it towards its own.
"""

import importlib
import inspect
from typing import NamedTuple

import torch
from torch import Tensor

from gca_pyg.distributed import all_gather_rows
from gca_pyg.errors import ConfigError
from gca_pyg.graph import BatchGraph
from gca_pyg.layout import ClassLayout
from gca_pyg.losses.metric import PML_PREFIX, MetricLoss, _construct
from gca_pyg.schema import LossConfig
from gca_pyg.synthesis import SyntheticSamples

__all__ = ["PMLMetricLoss", "SyntheticReferences", "synthetic_references"]


class SyntheticReferences(NamedTuple):
    """A batch's synthetic negatives in the order of the trailing arguments of a PML loss,
    ``loss_fn(embeddings, labels, indices_tuple, ref_emb, ref_labels)``.

    Attributes:
        indices_tuple: Pairs ``(anchors, positives, anchors, negatives)``: every anchor with each
            real positive of its class, and with each synthetic negative made for it; anchors
            index the batch, positives and negatives :attr:`ref_emb`. Pair losses take them as
            they are, triplet losses as every (anchor, positive, negative) of one anchor.
        ref_emb: The batch's embeddings, then the synthetic negatives (grouped by anchor in batch
            order, then by class, ascending): :math:`(N + G, D)`; ``ref_emb[N:]`` are the
            synthetic negatives alone.
        ref_labels: Their labels; a synthetic negative's is the class it stands for.
    """

    indices_tuple: tuple[Tensor, Tensor, Tensor, Tensor]
    ref_emb: Tensor
    ref_labels: Tensor


def synthetic_references(
    embeddings: Tensor,
    negatives: SyntheticSamples,
    layout: ClassLayout,
    classes: Tensor,
) -> SyntheticReferences:
    r"""The synthetic negatives of a batch as PML references, each a negative of its own anchor
    only (rows of the anchor's own class are left out).

    Args:
        embeddings: The batch :math:`(N, D)`.
        negatives: Its synthetic samples (all of them: under ``torchrun``, every process's).
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`.
        classes: The label of each class row of `layout`
            (:attr:`BatchGraph.classes <gca_pyg.graph.BatchGraph.classes>`).
    """
    num_nodes, device = embeddings.size(0), embeddings.device
    keep = negatives.is_negative(layout)
    anchor, class_index = negatives.anchor[keep], negatives.class_index[keep]
    order = torch.argsort(anchor * layout.num_classes + class_index)
    anchor, class_index = anchor[order], class_index[order]
    nodes = torch.arange(num_nodes, device=device)
    classmates = layout.members[layout.class_index]  # (N, K), each anchor among them
    is_other = classmates != nodes.unsqueeze(1)
    labels = classes[layout.class_index]
    return SyntheticReferences(
        indices_tuple=(
            nodes.unsqueeze(1).expand_as(classmates)[is_other],
            classmates[is_other],
            anchor,
            num_nodes + torch.arange(anchor.numel(), device=device),
        ),
        ref_emb=torch.cat([embeddings, negatives.embeddings[keep][order]]),
        ref_labels=torch.cat([labels, classes[class_index]]),
    )


class PMLMetricLoss(MetricLoss):
    r"""A pytorch-metric-learning loss as :math:`J_m` and :math:`J_{syn}` (see the module's text).

    Its parameters (a proxy loss's proxies) are the metric loss's own: the metric update trains
    them with ``optim.metric_lr × optim.proxy_lr_ratio``.

    Args:
        loss (torch.nn.Module): A loss of ``pytorch_metric_learning.losses``.
    """

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss
        self.takes_references = _takes_references(loss)

    @classmethod
    def from_config(
        cls, config: LossConfig, num_classes: int, embedding_size: int
    ) -> "PMLMetricLoss":
        """``pml:<LossName>`` of ``loss.metric`` with ``loss.metric_kwargs``; ``num_classes`` and
        ``embedding_size`` are passed to the losses that take them (the proxy losses).

        Raises:
            ConfigError: If pytorch-metric-learning is not installed, has no such loss, or a
                keyword argument does not fit it.
        """
        name = config.metric[len(PML_PREFIX) :]
        try:
            losses = importlib.import_module("pytorch_metric_learning.losses")
        except ImportError:
            raise ConfigError(
                f"'loss.metric' {config.metric} needs pytorch-metric-learning: "
                'pip install "gca-pyg[pml]"'
            ) from None
        base = losses.BaseMetricLossFunction
        found = getattr(losses, name, None)
        if not (isinstance(found, type) and issubclass(found, base) and found is not base):
            known = sorted(
                key
                for key, value in vars(losses).items()
                if isinstance(value, type) and issubclass(value, base) and value is not base
            )
            raise ConfigError(
                f"'loss.metric' is {config.metric}, but pytorch_metric_learning.losses has no "
                f"loss {name!r}; e.g. {', '.join(PML_PREFIX + key for key in known[:8])}, ..."
            )
        parameters = inspect.signature(found).parameters
        sizes = {"num_classes": num_classes, "embedding_size": embedding_size}
        defaults = {key: value for key, value in sizes.items() if key in parameters}
        return cls(_construct(found, config.metric, config.metric_kwargs, **defaults))

    def forward(self, embeddings: Tensor, labels: Tensor, *, layout=None) -> Tensor:
        """:math:`J_m`: ``loss(embeddings, labels)``."""
        return self.loss(embeddings, labels)

    def synthetic_loss(
        self, embeddings: Tensor, negatives: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: every process's synthetic negatives as references, each paired with
        its own anchor (or, for a loss that takes no references, as samples of their classes)."""
        group = graph.process_group
        if group is not None:  # every process computes the loss of the whole batch
            negatives = SyntheticSamples(
                embeddings=all_gather_rows(negatives.embeddings, group),
                anchor=all_gather_rows(negatives.anchor, group),
                class_index=all_gather_rows(negatives.class_index, group),
            )
        if not self.takes_references:
            keep = negatives.is_negative(graph.layout)
            return self.loss(negatives.embeddings[keep], negatives.labels(graph.classes)[keep])
        references = synthetic_references(embeddings, negatives, graph.layout, graph.classes)
        return self.loss(embeddings, graph.labels, *references)

    @property
    def class_centres(self):
        """The proxies of a proxy loss (its ``proxies`` of shape (classes, D)), else None."""
        proxies = getattr(self.loss, "proxies", None)
        return proxies if isinstance(proxies, Tensor) and proxies.dim() == 2 else None


def _takes_references(loss: torch.nn.Module) -> bool:
    """Whether a PML loss accepts ``ref_emb`` (its ``compute_loss`` does not refuse them)."""
    try:
        source = inspect.getsource(type(loss).compute_loss)
    except (OSError, TypeError):
        return True
    return "ref_not_supported" not in source
