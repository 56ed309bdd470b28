"""Small tensor helpers shared across modules."""

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch
from torch import Tensor

__all__ = ["autocast", "gather_rows", "correlation_edge_features"]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> AbstractContextManager:
    """``torch.autocast`` to `dtype` on `device`'s type, or nothing for ``dtype=None`` (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def gather_rows(source: Tensor, index: Tensor) -> Tensor:
    """``source[index]`` for an integer `index` of any shape, with a deterministic backward.

    Advanced indexing accumulates its gradient with a parallel ``index_put_``, whose summation order
    varies from run to run on the CPU; ``index_select`` accumulates with ``index_add_``, which does
    not, so a seeded run repeats bit for bit.

    Returns:
        A tensor of shape ``(*index.shape, *source.shape[1:])``.
    """
    return source.index_select(0, index.reshape(-1)).view(*index.shape, *source.shape[1:])


def correlation_edge_features(x: Tensor, edge_index: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Per-channel correlation of the two end points of every edge, GCA-HNG's edge features.

    .. math::
        \mathbf{e}_{ij} = \hat{\mathbf{x}}_i \odot \hat{\mathbf{x}}_j, \qquad
        \hat{\mathbf{x}}_i = \frac{\mathbf{x}_i - \bar{x}_i}{\max(\lVert \mathbf{x}_i -
        \bar{x}_i \rVert, \epsilon)}

    with :math:`\bar{x}_i` the mean of the channels of :math:`\mathbf{x}_i`: the channels of
    :math:`\mathbf{e}_{ij}` sum to the Pearson correlation of :math:`\mathbf{x}_i` and
    :math:`\mathbf{x}_j`, and :math:`\mathbf{e}_{ij} = \mathbf{e}_{ji}`.

    Args:
        x (torch.Tensor): Node features :math:`(|\mathcal{V}|, F)`.
        edge_index (torch.Tensor): Edge indices :math:`(2, |\mathcal{E}|)`.
        eps (float, optional): Lower bound of the norm. (default: :obj:`1e-12`)

    Shapes:
        - **output:** edge features :math:`(|\mathcal{E}|, F)`
    """
    centred = x - x.mean(dim=1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(eps)
    return gather_rows(unit, edge_index[0]) * gather_rows(unit, edge_index[1])
