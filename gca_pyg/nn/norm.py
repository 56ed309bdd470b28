from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn import BatchNorm1d

from gca_pyg.distributed import all_reduce_sum


class WeightedBatchNorm1d(BatchNorm1d):
    r""":class:`torch.nn.BatchNorm1d` whose batch statistics may count rows with multiplicities.

    With :obj:`row_weight` :math:`w`, training-mode statistics are those of the batch in which row
    :math:`r` occurs :math:`w_r` times:

    .. math::
        \mu = \frac{\sum_r w_r \mathbf{x}_r}{\sum_r w_r}, \qquad
        \sigma^2 = \frac{\sum_r w_r (\mathbf{x}_r - \mu)^2}{\sum_r w_r}

    and the running statistics are updated as :class:`~torch.nn.BatchNorm1d` would for that
    expanded batch. An undirected edge store (each off-diagonal pair once, weight 2) thus normalises
    exactly like the directed graph that holds both directions. Without :obj:`row_weight` and
    :obj:`process_group` it is a plain :class:`~torch.nn.BatchNorm1d`.

    Args:
        num_features (int): :math:`F`.
        process_group (torch.distributed.ProcessGroup, optional): As in
            :class:`~torch.nn.SyncBatchNorm`: the batch is the rows of all processes of the group
            (statistics summed over them), as when a graph's edges are split between processes.
            (default: :obj:`None`)
        **kwargs (optional): The other arguments of :class:`~torch.nn.BatchNorm1d`.

    Shapes:
        - **input:** :math:`(R, F)`, row weights :math:`(R,)` *(optional)*
        - **output:** :math:`(R, F)`
    """

    def __init__(
        self, num_features: int, *, process_group: Optional[ProcessGroup] = None, **kwargs
    ):
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    def forward(self, input: Tensor, row_weight: Optional[Tensor] = None) -> Tensor:
        """Normalises `input` (rows weighted by `row_weight`, over all processes of the group)."""
        group = self.process_group
        if row_weight is None and group is None:
            return super().forward(input)
        if row_weight is None:
            row_weight = input.new_ones(input.size(0))
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )

        # The batch statistics, and the gradients through them, cancel heavily: at least fp32 even
        # when the rows arrive in bf16 from an autocast region.
        input = input.to(torch.promote_types(input.dtype, torch.float32))
        weight = row_weight.to(input.dtype).unsqueeze(-1)
        count = all_reduce_sum(weight.sum(), group)
        mean = all_reduce_sum((weight * input).sum(dim=0), group) / count
        var = all_reduce_sum((weight * (input - mean).square()).sum(dim=0), group) / count
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        out = (input - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor):
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        else:
            momentum = self.momentum
        unbiased_var = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


class L2Normalize(torch.nn.Module):
    r"""Scales every row to unit Euclidean norm,

    .. math::
        \mathbf{z}_i \leftarrow \frac{\mathbf{z}_i}{\max(\lVert \mathbf{z}_i \rVert, \epsilon)}.

    Args:
        eps (float, optional): Smallest norm divided by. (default: :obj:`1e-12`)

    Shapes:
        - **input:** :math:`(N, F)`
        - **output:** :math:`(N, F)`
    """

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        return F.normalize(input, p=2.0, dim=-1, eps=self.eps)
