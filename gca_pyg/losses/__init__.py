"""The losses of GCA-HNG (docs/method.md, "Losses").

Metric losses (:class:`MetricLoss`: :math:`J_m` on the real batch, :math:`J_{syn}` with synthetic
negatives; ``loss.metric`` names one, :func:`build_metric_loss` builds it):

* :mod:`~gca_pyg.losses.metric`: the :class:`MetricLoss` protocol and its registry;
* :mod:`~gca_pyg.losses.npair`: the multi-class N-pair loss (``npair``, :class:`NPairLoss`);
* :mod:`~gca_pyg.losses.proxy_anchor`: Proxy-Anchor (``proxy_anchor``, :class:`ProxyAnchorLoss`);
* :mod:`~gca_pyg.losses.pml`: any loss of pytorch-metric-learning (``pml:<LossName>``,
  :class:`PMLMetricLoss`).

The generator's own losses (:mod:`~gca_pyg.losses.generation`): :func:`synthetic_class_loss`
(:math:`J_{ce}`), :func:`similarity_loss` (:math:`J_{sim}`), :func:`diversity_loss`
(:math:`J_{div}`).

Pairings come from the labels (:func:`~gca_pyg.layout.class_layout`), never from where a class
sits in the batch. The losses over synthetic samples and fusion weights read the step's
:class:`~gca_pyg.graph.BatchGraph`: each process passes the rows it computed, sums are combined
over the graph's process group with :func:`gca_pyg.distributed.all_reduce_sum`, and every process
returns the loss of the whole batch.
"""

from gca_pyg.losses.builder import build_metric_loss
from gca_pyg.losses.generation import diversity_loss, similarity_loss, synthetic_class_loss
from gca_pyg.losses.metric import (
    METRIC_LOSSES,
    PML_PREFIX,
    MetricLoss,
    metric_loss_names,
    register_metric_loss,
)
from gca_pyg.losses.npair import NPairLoss, npair_loss, synthetic_npair_loss
from gca_pyg.losses.pml import PMLMetricLoss, SyntheticReferences, synthetic_references
from gca_pyg.losses.proxy_anchor import (
    SYNTHETIC_PROXIES,
    ProxyAnchorLoss,
    proxy_anchor_loss,
    synthetic_proxy_anchor_loss,
)

__all__ = [
    "MetricLoss",
    "METRIC_LOSSES",
    "PML_PREFIX",
    "register_metric_loss",
    "metric_loss_names",
    "build_metric_loss",
    "NPairLoss",
    "ProxyAnchorLoss",
    "PMLMetricLoss",
    "SyntheticReferences",
    "synthetic_references",
    "SYNTHETIC_PROXIES",
    "npair_loss",
    "synthetic_npair_loss",
    "proxy_anchor_loss",
    "synthetic_proxy_anchor_loss",
    "synthetic_class_loss",
    "similarity_loss",
    "diversity_loss",
]
