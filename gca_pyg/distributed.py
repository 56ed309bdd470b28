"""Several processes, one batch graph: the process group and the collectives GCA-HNG needs.

Under ``torchrun`` every process embeds its own share of the global batch (whole classes), the
embeddings are gathered with autograd, and the graph's edge pairs are split between the processes
(:func:`gca_pyg.graph.shard_pairs`). Every process then computes the same global losses; the
collectives below sum in both directions (forward values and backward gradients), so after
``loss.backward()`` the gradients averaged over the processes (:func:`average_gradients`) are
exactly the single-process gradients of the global batch.

Without ``torchrun`` (or with one process) :func:`setup` returns a context whose
``process_group`` is ``None`` and every collective here is the identity.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from gca_pyg.errors import ConfigError

__all__ = [
    "Context",
    "setup",
    "teardown",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_rows",
    "average_gradients",
    "average_buffers",
    "broadcast_parameters",
    "broadcast_tensor",
    "rank_and_size",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and its device.

    Attributes:
        rank: This process's rank, 0 for the single-process case.
        world_size: The number of processes (1 without ``torchrun``).
        device: This process's device.
        process_group: The process group of the collectives, or ``None`` for one process.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    process_group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def setup(device: torch.device, backend: str = "auto", timeout_seconds: float = 600.0) -> Context:
    """Starts the process group when launched by ``torchrun`` and picks this process's device.

    Args:
        device: The device the config asks for (CUDA devices are spread over the processes of a
            node by ``LOCAL_RANK``).
        backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``gloo`` or ``nccl``.
        timeout_seconds: How long a collective waits for a missing process before it fails, so a
            process that died makes the others exit with an error instead of hanging.

    Raises:
        ConfigError: If the backend does not fit the device, or a process has no GPU of its own.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes "
                f"on this node but it has {torch.cuda.device_count()} CUDA device(s); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            "train.dist_backend is 'nccl' but training runs on the CPU; use "
            "--set train.dist_backend=gloo (or auto)"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return Context(rank=rank, world_size=world, device=device, process_group=dist.group.WORLD)


def teardown(context: Context):
    """Leaves the process group (a no-op for one process)."""
    if context.process_group is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_size(process_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """This process's rank in `process_group` and the group's size; ``(0, 1)`` for ``None``."""
    if process_group is None:
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient is summed over processes too."""

    @staticmethod
    def forward(ctx, tensor: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=process_group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.process_group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    """Concatenation of every process's rows; each process's rows receive the gradient summed
    over processes."""

    @staticmethod
    def forward(ctx, tensor: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        out, ctx.offsets = _gather(tensor, process_group)
        ctx.rank = dist.get_rank(process_group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.process_group)
        return grad[ctx.offsets[ctx.rank] : ctx.offsets[ctx.rank + 1]], None


def _gather(tensor: Tensor, process_group) -> tuple[Tensor, list[int]]:
    """All processes' rows (their counts may differ) and the row offset of each process."""
    counts = [
        torch.zeros(1, dtype=torch.long, device=tensor.device)
        for _ in range(dist.get_world_size(process_group))
    ]
    dist.all_gather(
        counts, torch.tensor([tensor.size(0)], device=tensor.device), group=process_group
    )
    counts = [int(count) for count in counts]
    padded = tensor.new_zeros(max(counts), *tensor.shape[1:])
    padded[: tensor.size(0)] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=process_group)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), offsets


def all_reduce_sum(tensor: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The sum of `tensor` over the processes of `process_group`, differentiable; the identity
    for ``None``."""
    if process_group is None:
        return tensor
    return _AllReduceSum.apply(tensor, process_group)


def all_reduce_max(tensor: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The elementwise maximum over processes, without gradient (for numerical stabilisers)."""
    if process_group is None:
        return tensor
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=process_group)
    return out


def all_gather_rows(tensor: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Every process's rows, rank by rank, differentiable; the processes' row counts may differ."""
    if process_group is None:
        return tensor
    if tensor.requires_grad:
        return _GatherRows.apply(tensor, process_group)
    return _gather(tensor.detach(), process_group)[0]


def average_gradients(
    parameters: Iterable[torch.nn.Parameter], process_group: Optional[dist.ProcessGroup] = None
):
    """Replaces every gradient by its mean over the processes (one flat all-reduce)."""
    _average_in_place([p.grad for p in parameters if p.grad is not None], process_group)


def average_buffers(module: torch.nn.Module, process_group: Optional[dist.ProcessGroup] = None):
    """Replaces every floating-point buffer (BatchNorm running statistics) by its mean over the
    processes, so that all of them hold the same model."""
    _average_in_place([b for b in module.buffers() if b.is_floating_point()], process_group)


def _average_in_place(tensors: list[Tensor], process_group: Optional[dist.ProcessGroup]):
    if process_group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=process_group)
    flat /= dist.get_world_size(process_group)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def broadcast_parameters(
    module: torch.nn.Module, process_group: Optional[dist.ProcessGroup] = None
):
    """Copies rank 0's parameters and buffers to every process."""
    if process_group is None:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0, group=process_group)


def broadcast_tensor(tensor: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Rank 0's `tensor` on every process, whatever the others hold (same number of dimensions,
    any sizes), so that all of them go on with one value; the identity without a group."""
    if process_group is None:
        return tensor
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    dist.broadcast(shape, src=0, group=process_group)
    if dist.get_rank(process_group) == 0:
        tensor = tensor.contiguous()
    else:
        tensor = tensor.new_empty(shape.tolist())
    dist.broadcast(tensor, src=0, group=process_group)
    return tensor


def all_gather_objects(value, process_group: Optional[dist.ProcessGroup] = None) -> list:
    """Every process's `value` (any picklable object), rank by rank."""
    if process_group is None:
        return [value]
    values = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(values, value, group=process_group)
    return values


def any_process(
    flag: bool,
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> bool:
    """True on every process if `flag` is True on any of them (e.g. a Ctrl-C seen by one)."""
    if process_group is None:
        return flag
    device = device if device is not None else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=process_group)
    return bool(value.item())
