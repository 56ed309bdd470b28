"""From ``loss.metric`` to a :class:`~gca_pyg.losses.metric.MetricLoss`: the built-in losses,
those registered with :func:`~gca_pyg.losses.metric.register_metric_loss`, and
``pml:<LossName>``."""

from gca_pyg.errors import ConfigError
from gca_pyg.losses.metric import METRIC_LOSSES, PML_PREFIX, MetricLoss, metric_loss_names
from gca_pyg.losses.npair import NPairLoss  # noqa: F401 (registers npair)
from gca_pyg.losses.pml import PMLMetricLoss
from gca_pyg.losses.proxy_anchor import ProxyAnchorLoss  # noqa: F401 (registers proxy_anchor)
from gca_pyg.schema import LossConfig

__all__ = ["build_metric_loss"]


def build_metric_loss(config: LossConfig, num_classes: int, embedding_size: int) -> MetricLoss:
    """The metric loss of ``loss.metric`` and ``loss.metric_kwargs``.

    Raises:
        ConfigError: One line, if the name is unknown, pytorch-metric-learning is missing for a
            ``pml:`` name, or a keyword argument does not fit the loss.
    """
    name = config.metric
    if name.startswith(PML_PREFIX):
        return PMLMetricLoss.from_config(config, num_classes, embedding_size)
    if name not in METRIC_LOSSES:
        raise ConfigError(f"'loss.metric' is '{name}'; valid values: {metric_loss_names()}")
    return METRIC_LOSSES[name].from_config(config, num_classes, embedding_size)
