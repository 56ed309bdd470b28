r"""What a metric loss of GCA-HNG is: :class:`MetricLoss`, and the registry of ``loss.metric``.

A metric loss gives two terms of the metric update (docs/method.md, "Losses"): :math:`J_m` on the
real batch (:meth:`MetricLoss.forward`) and :math:`J_{syn}` over the batch's synthetic negatives
(:meth:`MetricLoss.synthetic_loss`). It may hold parameters of its own (Proxy-Anchor's proxies),
which the metric update trains with ``optim.metric_lr × optim.proxy_lr_ratio``. Adding one is one
class and one name::

    @register_metric_loss("my_loss")
    class MyLoss(MetricLoss):
        def forward(self, embeddings, labels, *, layout=None): ...
        def synthetic_loss(self, embeddings, negatives, graph): ...

after which ``loss.metric: my_loss`` trains with it (``loss.metric_kwargs`` are its constructor's
keyword arguments). ``loss.metric: pml:<LossName>`` takes any loss of pytorch-metric-learning
instead (:class:`~gca_pyg.losses.pml.PMLMetricLoss`); :func:`~gca_pyg.losses.build_metric_loss`
builds the loss a config names.
"""

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gca_pyg.errors import ConfigError
from gca_pyg.graph import BatchGraph
from gca_pyg.layout import ClassLayout
from gca_pyg.schema import LossConfig
from gca_pyg.synthesis import SyntheticSamples

__all__ = [
    "MetricLoss",
    "METRIC_LOSSES",
    "PML_PREFIX",
    "register_metric_loss",
    "metric_loss_names",
]

#: ``loss.metric`` names of the built-in and registered metric losses, to their classes.
METRIC_LOSSES: dict[str, type["MetricLoss"]] = {}
#: ``loss.metric: pml:<LossName>``: a loss of ``pytorch_metric_learning.losses``.
PML_PREFIX = "pml:"


class MetricLoss(torch.nn.Module, ABC):
    r"""A metric loss in GCA-HNG's metric update: :math:`J_m` on the real batch and
    :math:`J_{syn}` with the synthetic negatives the generator made for it,

    .. math::
        J_{metric} = J_m + w\,J_{syn} + J_{gce},

    :math:`w` being the generator's synthetic weight. How a synthetic negative enters
    :math:`J_{syn}` is the loss's own business: N-pair compares it with the anchor's positive,
    Proxy-Anchor with the anchor's proxy, a pytorch-metric-learning loss gets it as a reference
    embedding paired with its own anchor only.

    Subclasses implement :meth:`forward` and :meth:`synthetic_loss`, and are registered under a
    ``loss.metric`` name with :func:`register_metric_loss`; :meth:`from_config` builds them from
    the ``loss`` section (by default, ``cls(**loss.metric_kwargs)``).

    Shapes:
        - **embeddings:** :math:`(N, D)`, not normalised; **labels:** :math:`(N,)` training class
          ids, a class-balanced batch (every class :math:`K \ge 2` times)
        - **output:** a scalar
    """

    @classmethod
    def from_config(cls, config: LossConfig, num_classes: int, embedding_size: int) -> "MetricLoss":
        """The loss of the ``loss`` section `config`, for `num_classes` training classes and
        embeddings of size `embedding_size`."""
        return _construct(cls, config.metric, config.metric_kwargs)

    @abstractmethod
    def forward(
        self, embeddings: Tensor, labels: Tensor, *, layout: Optional[ClassLayout] = None
    ) -> Tensor:
        """:math:`J_m` of the real batch; `layout` is the batch's
        :class:`~gca_pyg.layout.ClassLayout`, when already derived."""

    @abstractmethod
    def synthetic_loss(
        self, embeddings: Tensor, negatives: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: the real batch `embeddings` against `negatives`, this process's
        synthetic samples of the step's :class:`~gca_pyg.graph.BatchGraph` `graph` (rows of the
        anchor's own class are not negatives and must be ignored). Under ``torchrun`` every
        process returns the loss of the whole batch (sums over the graph's process group)."""

    @property
    def class_centres(self) -> Optional[Tensor]:
        """One vector per training class that the loss trains (proxies), or None: read by the
        synthesis diagnostics."""
        return None


def register_metric_loss(name: str) -> Callable[[type[MetricLoss]], type[MetricLoss]]:
    """A class decorator: ``loss.metric: name`` builds the decorated :class:`MetricLoss`."""

    def register(cls: type[MetricLoss]) -> type[MetricLoss]:
        if not (isinstance(cls, type) and issubclass(cls, MetricLoss)):
            raise TypeError(f"register_metric_loss({name!r}) decorates a MetricLoss subclass")
        taken = METRIC_LOSSES.get(name)
        same = taken is not None and (taken.__module__, taken.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )  # the same definition run again (a notebook cell, a reloaded module)
        if name.startswith(PML_PREFIX) or (taken is not None and not same):
            raise ValueError(f"the metric loss name {name!r} is taken")
        METRIC_LOSSES[name] = cls
        return cls

    return register


def metric_loss_names() -> str:
    """The valid values of ``loss.metric``, for error messages."""
    return ", ".join([*METRIC_LOSSES, f"{PML_PREFIX}<LossName> (pytorch-metric-learning)"])


def _construct(cls: Callable[..., Any], name: str, kwargs: dict[str, Any], **defaults) -> Any:
    """``cls(**{**defaults, **kwargs})``, a keyword that does not fit being one ConfigError."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a callable without a signature: let the call decide
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in kwargs if parameters and not takes_any and key not in parameters]
    if unknown:
        valid = [key for key, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        raise ConfigError(
            f"'loss.metric_kwargs' has '{unknown[0]}', which {name} does not take; its keyword "
            f"arguments: {', '.join(valid) or 'none'}"
        )
    for key, value in kwargs.items():
        default = getattr(parameters.get(key), "default", inspect.Parameter.empty)
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            fits = isinstance(value, type(default))
        if not fits:
            raise ConfigError(
                f"'loss.metric_kwargs' has {key}: {value!r} for {name}, whose {key} is a "
                f"{'number' if type(default) in (int, float) else type(default).__name__} "
                f"(default {default!r})"
            )
    try:
        return cls(**{**defaults, **kwargs})
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"'loss.metric_kwargs' {kwargs} do not fit {name}: {str(error).splitlines()[0]}"
        ) from None
