"""Small tensor helpers shared across modules."""

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch
from torch import Tensor

__all__ = ["autocast", "gather_rows"]


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
