"""The Proxy-Anchor track: the Proxy-Anchor loss on the batch (:math:`J_m`) and over synthetic
negatives in one of five roles (:math:`J_{syn}`)."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.distributed import all_reduce_sum
from gca_pyg.graph import BatchGraph
from gca_pyg.layout import ClassLayout
from gca_pyg.losses.metric import MetricLoss, _construct, register_metric_loss
from gca_pyg.schema import SYNTHETIC_PROXIES, LossConfig
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.utils import gather_rows

__all__ = [
    "ProxyAnchorLoss",
    "proxy_anchor_loss",
    "synthetic_proxy_anchor_loss",
    "SYNTHETIC_PROXIES",
]


def _log_one_plus_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    r""":math:`\log(1 + \sum_r e^{x_{rp}})` over the rows :math:`r` where `mask` holds, for every
    column :math:`p` (a log-sum-exp with a zero logit, so it is stable at any scale)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([logits, logits.new_zeros(1, logits.size(1))]), dim=0)


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Tensor:
    r"""The Proxy-Anchor loss (`Kim et al., "Proxy Anchor Loss for Deep Metric Learning"
    <https://arxiv.org/abs/2003.13911>`_, CVPR 2020): every proxy is an anchor, pulling the batch's
    samples of its class and pushing the others away,

    .. math::
        J = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+}
            e^{-\alpha (s(x, p) - \delta)}\Big)
          + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-}
            e^{\alpha (s(x, p) + \delta)}\Big),

    with :math:`s` the cosine similarity, :math:`\delta` the margin, :math:`\alpha` the scale,
    :math:`P` all proxies (one per training class), :math:`P^+` those with a sample in the batch and
    :math:`X_p^+`, :math:`X_p^-` the batch's samples of :math:`p`'s class and of the others.

    Args:
        embeddings: :math:`(N, D)`, not normalised.
        labels: :math:`(N,)`, training class ids in :math:`0 \dots |P| - 1`.
        proxies: :math:`(|P|, D)`, row :math:`c` the proxy of class :math:`c`.
        margin: :math:`\delta`. (default: :obj:`0.1`)
        alpha: :math:`\alpha`. (default: :obj:`32.0`)
    """
    cosine = F.linear(F.normalize(embeddings, dim=-1), F.normalize(proxies, dim=-1))
    positive = F.one_hot(labels, proxies.size(0)).bool()
    pull = _log_one_plus_sum_exp(-alpha * (cosine - margin), positive)
    push = _log_one_plus_sum_exp(alpha * (cosine + margin), ~positive)
    return pull.sum() / positive.any(dim=0).sum() + push.sum() / proxies.size(0)


def _log_one_plus(sums: Tensor, bound: float) -> Tensor:
    r""":math:`\log(1 + \sum_r e^{x_r})` from :math:`\sum_r e^{x_r - b}` (each :math:`x_r \le b`,
    so the sums cannot overflow at any scale)."""
    return torch.log(sums + math.exp(-bound)) + bound


def _mean_over_present(values: Tensor, counts: Tensor, process_group) -> Tensor:
    """The mean of `values` over the entries whose (all-reduced) `counts` are positive."""
    present = all_reduce_sum(counts, process_group) > 0
    return values[present].sum() / present.sum().clamp_min(1)


def synthetic_proxy_anchor_loss(
    synthetic: SyntheticSamples,
    graph: BatchGraph,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    *,
    negative_of: str = "anchor",
    embeddings: Optional[Tensor] = None,
) -> Tensor:
    r""":math:`J_{syn}` of the Proxy-Anchor track: the synthetic negatives in one of five roles.

    A synthetic negative :math:`\tilde{\mathbf{n}}_{i,c}` is built to lie near anchor :math:`i`
    (of class :math:`y_i`) while reading as another class :math:`c`. With :math:`s` the cosine
    similarity, :math:`\delta` the margin, :math:`\alpha` the scale, :math:`\mathbf{p}_c` the proxy
    of class :math:`c` and :math:`\operatorname{lse}^+(X) = \log(1 + \sum_{x \in X} e^x)`:

    * ``"anchor"``: a negative of its anchor's proxy, :math:`S_p = \{\tilde{\mathbf{n}}_{i,c} :
      y_i = p\}`, :math:`J_{syn} = \operatorname{mean}_{p \in P_s} \operatorname{lse}^+
      \{\alpha (s(\tilde{\mathbf{n}}, \mathbf{p}_p) + \delta) : \tilde{\mathbf{n}} \in S_p\}`.
    * ``"others"``: the same push, a negative of every proxy but its own class's,
      :math:`S_p = \{\tilde{\mathbf{n}}_{i,c} : c \ne p\}`.
    * ``"relative"``: the anchor's proxy must prefer the anchor to each of its synthetic
      negatives, as N-pair's :math:`J_{syn}` prefers the positive:
      :math:`J_{syn} = \operatorname{mean}_i \operatorname{lse}^+ \{\alpha
      (s(\tilde{\mathbf{n}}_{i,c}, \mathbf{p}_{y_i}) - s(\mathbf{a}_i, \mathbf{p}_{y_i}) + \delta)
      : c\}`. Moving the anchor and its negative together changes nothing; only what tells
      them apart is learned.
    * ``"proxy_positive"``: N-pair's :math:`J_{syn}` with the anchor's proxy as its positive:
      the anchor must be closer to its proxy than to each of its synthetic negatives,
      :math:`J_{syn} = \operatorname{mean}_i \operatorname{lse}^+ \{\alpha
      (s(\mathbf{a}_i, \tilde{\mathbf{n}}_{i,c}) - s(\mathbf{a}_i, \mathbf{p}_{y_i}) + \delta)
      : c\}`: a sample-to-sample push, which Proxy-Anchor's own terms lack.
    * ``"class"``: a sample of the class it stands for, in the Proxy-Anchor loss itself: the push
      of ``"others"`` plus the pull :math:`\operatorname{mean}_{c \in P_s^+} \operatorname{lse}^+
      \{-\alpha (s(\tilde{\mathbf{n}}_{i,c}, \mathbf{p}_c) - \delta) : i\}`.

    Means run over the proxies (anchors) with at least one term, :math:`P_s` (:math:`P_s^+`); rows
    of the anchor's own class are ignored; the sums run over the rows of all processes.

    Args:
        synthetic: This process's synthetic samples.
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
        proxies, margin, alpha: As in :func:`proxy_anchor_loss`.
        negative_of: ``"anchor"``, ``"others"``, ``"relative"``, ``"proxy_positive"`` or
            ``"class"``, see above. (default: :obj:`"anchor"`)
        embeddings: The real batch :math:`(N, D)`; needed by ``"relative"`` and
            ``"proxy_positive"``.
    """
    if negative_of not in SYNTHETIC_PROXIES:
        raise ValueError(
            f"negative_of must be one of {', '.join(SYNTHETIC_PROXIES)}, got {negative_of!r}"
        )
    if negative_of in ("relative", "proxy_positive") and embeddings is None:
        raise ValueError(
            f"synthetic_proxy_anchor_loss(negative_of={negative_of!r}) needs the embeddings of "
            "the batch"
        )
    group = graph.process_group
    num_proxies = proxies.size(0)
    is_negative = synthetic.is_negative(graph.layout)
    unit = F.normalize(synthetic.embeddings, dim=-1)
    unit_proxies = F.normalize(proxies, dim=-1)
    # Every exponent below is at most its bound (cosines lie in [-1, 1]): no overflow at any alpha.
    bound = alpha * (1.0 + margin)
    if negative_of in ("anchor", "relative", "proxy_positive"):
        proxy = graph.labels[synthetic.anchor]
        cosine = (  # the negative's cosine to the anchor's proxy, or (proxy_positive) to the anchor
            unit * gather_rows(unit_proxies, proxy)
            if negative_of != "proxy_positive"
            else unit * gather_rows(F.normalize(embeddings, dim=-1), synthetic.anchor)
        ).sum(dim=-1)
        if negative_of == "anchor":
            exponent = alpha * (cosine + margin)
            slots, num_slots = proxy, num_proxies
        else:
            unit_anchors = F.normalize(embeddings, dim=-1)
            anchor_cosine = F.linear(unit_anchors, unit_proxies)
            own = anchor_cosine.gather(1, graph.labels.unsqueeze(1)).squeeze(1)
            exponent = alpha * (cosine - gather_rows(own, synthetic.anchor) + margin)
            bound = alpha * (2.0 + margin)
            slots, num_slots = synthetic.anchor, embeddings.size(0)
        terms = torch.where(is_negative, torch.exp(exponent - bound), 0.0)
        sums = all_reduce_sum(unit.new_zeros(num_slots).index_add(0, slots, terms), group)
        counts = unit.new_zeros(num_slots).index_add(0, slots, is_negative.to(unit.dtype))
        return _mean_over_present(_log_one_plus(sums, bound), counts, group)
    cosine = F.linear(unit, unit_proxies)  # (G, |P|)
    own_class = F.one_hot(synthetic.labels(graph.classes), num_proxies).bool()
    negative = is_negative.unsqueeze(1) & ~own_class
    terms = torch.where(negative, torch.exp(alpha * (cosine + margin) - bound), 0.0)
    sums = all_reduce_sum(terms.sum(dim=0), group)
    push = _mean_over_present(_log_one_plus(sums, bound), negative.sum(dim=0).to(unit.dtype), group)
    if negative_of == "others":
        return push
    positive = is_negative.unsqueeze(1) & own_class
    pull_bound = alpha * (1.0 + margin)
    terms = torch.where(positive, torch.exp(-alpha * (cosine - margin) - pull_bound), 0.0)
    sums = all_reduce_sum(terms.sum(dim=0), group)
    counts = positive.sum(dim=0).to(unit.dtype)
    return push + _mean_over_present(_log_one_plus(sums, pull_bound), counts, group)


@register_metric_loss("proxy_anchor")
class ProxyAnchorLoss(MetricLoss):
    r"""The Proxy-Anchor track: :math:`J_m` = :func:`proxy_anchor_loss` on the real batch and
    :math:`J_{syn}` = :func:`synthetic_proxy_anchor_loss` over synthetic negatives. Holds the
    proxies, one per training class, initialised as in the paper (Kaiming normal, fan out); they
    are parameters, trained by the metric update (usually with a learning rate 100× the
    backbone's).

    Args:
        num_classes (int): Training classes, one proxy each.
        embedding_size (int): :math:`D`.
        margin (float, optional): :math:`\delta`. (default: :obj:`0.1`)
        alpha (float, optional): :math:`\alpha`. (default: :obj:`32.0`)
        synthetic_proxies (str, optional): ``negative_of`` of
            :func:`synthetic_proxy_anchor_loss`. (default: :obj:`"relative"`, the form that
            measured least harmful; gca_pyg 0.2.0 had only ``"anchor"``)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        synthetic_proxies: str = "relative",
    ):
        super().__init__()
        if synthetic_proxies not in SYNTHETIC_PROXIES:
            raise ValueError(
                f"synthetic_proxies must be one of {', '.join(SYNTHETIC_PROXIES)}, "
                f"got {synthetic_proxies!r}"
            )
        self.margin, self.alpha, self.synthetic_proxies = margin, alpha, synthetic_proxies
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, config: LossConfig, num_classes: int, embedding_size: int
    ) -> "ProxyAnchorLoss":
        """``loss.proxy_margin``, ``loss.proxy_alpha`` and ``loss.synthetic_proxies``, unless
        ``loss.metric_kwargs`` sets ``margin``, ``alpha`` or ``synthetic_proxies``."""
        return _construct(
            cls,
            "proxy_anchor",
            config.metric_kwargs,
            num_classes=num_classes,
            embedding_size=embedding_size,
            margin=config.proxy_margin,
            alpha=config.proxy_alpha,
            synthetic_proxies=config.synthetic_proxies,
        )

    def reset_parameters(self):
        torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    @property
    def class_centres(self) -> Tensor:
        """The proxies."""
        return self.proxies

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, layout: Optional[ClassLayout] = None
    ) -> Tensor:
        """:math:`J_m` of a batch (`layout` is accepted for the signature :class:`NPairLoss`
        shares, and not needed)."""
        return proxy_anchor_loss(embeddings, labels, self.proxies, self.margin, self.alpha)

    def synthetic_loss(
        self, embeddings: Tensor, negatives: SyntheticSamples, graph: BatchGraph
    ) -> Tensor:
        """:math:`J_{syn}`: the synthetic negatives in the role ``synthetic_proxies``."""
        return synthetic_proxy_anchor_loss(
            negatives,
            graph,
            self.proxies,
            self.margin,
            self.alpha,
            negative_of=self.synthetic_proxies,
            embeddings=embeddings,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.proxies.size(0)}, {self.proxies.size(1)}, margin={self.margin}, "
            f"alpha={self.alpha}, synthetic_proxies={self.synthetic_proxies!r}"
        )
