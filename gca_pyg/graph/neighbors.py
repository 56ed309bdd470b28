"""The pairs of the sparse batch graph, mined by nearest-neighbour search.

For large batches the graph can be sparse (``graph.neighbors: k``): :func:`knn_pairs` keeps each
node's :math:`k` most similar samples (a faiss search) and all of its classmates, and
:func:`~gca_pyg.graph.sharding.sparse_shard` derives the (anchor, class) groups of those pairs.

With memory nodes (``graph.memory: M``, :mod:`gca_pyg.graph.memory_nodes`), :func:`knn_memory_pairs`
searches the batch and the memory together (a matrix product and top-:math:`k`). Both give their
pairs in the block order of :func:`~gca_pyg.graph.sharding.shard_pairs`.
"""

import math
from typing import Optional

import faiss
import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.graph.memory_nodes import MemoryNodes
from gca_pyg.graph.sharding import _pair_block
from gca_pyg.layout import class_layout

__all__ = ["knn_memory_pairs", "knn_pairs"]


def knn_pairs(z: Tensor, y: Tensor, k: int) -> Tensor:
    r"""The undirected pairs of the sparse batch graph: each node's :math:`k` most similar samples
    and all of its classmates.

    Node :math:`i` is joined to itself, to every :math:`j` with :math:`y_j = y_i`, and to

    .. math::
        \mathcal{N}_k(i) = \operatorname{top-}k_{\,j \ne i}\;
        \frac{\mathbf{z}_i^\top \mathbf{z}_j}{\lVert\mathbf{z}_i\rVert\,\lVert\mathbf{z}_j\rVert},

    found exactly by a :class:`faiss.IndexFlatIP` search on the L2-normalised embeddings (no
    gradient flows through the choice). The pairs are symmetrised: :math:`\{i, j\}` is stored once
    if :math:`j \in \mathcal{N}_k(i)` or :math:`i \in \mathcal{N}_k(j)`. They come in the order of
    :func:`shard_pairs`: the blocks of two classes :math:`a < b`, then the blocks within one class,
    each in batch order; with :math:`k \ge N - 1` on a class-balanced batch the result is exactly
    ``shard_pairs(class_layout(y)).edge_index``.

    Args:
        z (torch.Tensor): Embeddings of shape :math:`(N, D)`.
        y (torch.Tensor): Labels of shape :math:`(N,)`.
        k (int): Neighbours per node, at least 1; :math:`k \ge N - 1` gives the complete graph.

    Returns:
        LongTensor of shape :math:`(2, |\mathcal{E}|)`, undirected storage (each pair once,
        self-loops included), on the device of :obj:`z`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn_pairs needs a positive int number of neighbours k, got {k!r}")
    if z.dim() != 2 or y.dim() != 1 or y.numel() != z.size(0):
        raise ValueError(
            f"knn_pairs expects embeddings [N, D] and labels [N], got "
            f"{tuple(z.shape)} and {tuple(y.shape)}"
        )
    num_nodes, device = z.size(0), z.device
    k = min(k, num_nodes - 1)
    unit = F.normalize(z.detach().float(), dim=1).cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    _, found = index.search(unit, k + 1)
    found = torch.from_numpy(found).to(device)
    nodes = torch.arange(num_nodes, device=device)
    # The k best other samples of each row (faiss marks missing results, e.g. of NaN rows, -1).
    valid = (found >= 0) & (found != nodes.unsqueeze(1))
    valid &= valid.cumsum(dim=1) <= k
    near_source, near_target = nodes.unsqueeze(1).expand_as(found)[valid], found[valid]
    _, class_index = torch.unique(y, return_inverse=True)
    mate_source, mate_target = _classmates(class_index)
    return _block_ordered(
        torch.cat([near_source, mate_source]), torch.cat([near_target, mate_target]), class_index
    )


def _classmates(class_index: Tensor) -> tuple[Tensor, Tensor]:
    """Every ordered pair of samples of one class (each sample with itself included)."""
    device = class_index.device
    node_of_slot = torch.sort(class_index, stable=True).indices  # each class's run, batch order
    counts = torch.bincount(class_index)
    run = counts[class_index[node_of_slot]]  # the length of each slot's class run
    run_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    source = torch.repeat_interleave(torch.arange(class_index.numel(), device=device), run)
    offsets = torch.arange(source.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(run, 0) - run, run
    )
    target = torch.repeat_interleave(run_start, run) + offsets
    return node_of_slot[source], node_of_slot[target]


def _block_ordered(first: Tensor, second: Tensor, node_class: Tensor) -> Tensor:
    """The distinct undirected pairs among ``{first[r], second[r]}`` in the order of
    :func:`shard_pairs`: by class-pair block (:func:`_pair_block` of the nodes' class rows
    `node_class`), within a block by (lower, higher) slot, a node's slot being its position in
    the nodes sorted by class, stably."""
    num_nodes = node_class.numel()
    node_of_slot = torch.sort(node_class, stable=True).indices
    slot = torch.empty_like(node_of_slot)
    slot[node_of_slot] = torch.arange(num_nodes, device=node_class.device)
    class_of_slot = node_class[node_of_slot]
    first, second = slot[first], slot[second]
    code = torch.unique(torch.minimum(first, second) * num_nodes + torch.maximum(first, second))
    low, high = code // num_nodes, code % num_nodes  # sorted by (low, high)
    num_classes = int(node_class.max()) + 1 if num_nodes else 0
    block = _pair_block(class_of_slot[low], class_of_slot[high], num_classes)
    order = torch.sort(block, stable=True).indices
    return torch.stack([node_of_slot[low[order]], node_of_slot[high[order]]])


def knn_memory_pairs(
    z: Tensor,
    y: Tensor,
    k: int,
    memory_z: Tensor,
    memory_y: Tensor,
    memory_k: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    r"""The sparse batch graph of :func:`knn_pairs` with memory nodes: each batch node's :math:`k`
    most similar among the batch and the memory.

    The candidates are the batch and the memory entries of classes that are *not* in the batch (a
    batch class is represented by its fresh embeddings, not by drifted copies of them). Batch node
    :math:`i` is joined to itself, its classmates and its :math:`k` nearest candidates by cosine
    (exact: a matrix product and top-:math:`k`; no gradient flows through the choice), of which
    at most :math:`K` (the batch's samples per class) of each memory class, the nearest: a memory
    class stands beside :math:`i` for as many samples as a batch class. The memory entries chosen
    by any batch node become memory nodes :math:`N + u`, in memory order, each with its self-loop;
    memory nodes are joined to the batch nodes that chose them, never to each other. Batch pairs
    are symmetrised as in :func:`knn_pairs`; pairs come in its block order, memory classes after
    the batch's (class rows :math:`C \dots`), a batch node first in every pair it has with a memory
    node. With no candidate chosen from the memory the pairs are those of a batch-only search.

    With `memory_k` the two are searched apart: each batch node's :math:`k` nearest in the batch
    (the pairs of :func:`knn_pairs`, which memory then leaves as they are) and its `memory_k`
    nearest among the memory's candidates (still at most :math:`K` of a class).

    Args:
        z (torch.Tensor): The batch's embeddings :math:`(N, D)`.
        y (torch.Tensor): Its labels :math:`(N,)`, class-balanced.
        k (int): Neighbours per batch node, at least 1.
        memory_z (torch.Tensor): The memory's embeddings :math:`(M, D)`.
        memory_y (torch.Tensor): Its labels :math:`(M,)`.
        memory_k (int, optional): Neighbours per batch node searched in the memory apart from
            the batch's :math:`k`; :obj:`None` for one search of :math:`k` over both.
            (default: :obj:`None`)

    Returns:
        ``(edge_index, memory_index)``: the undirected pairs :math:`(2, |\mathcal{E}|)` over the
        :math:`N + U` nodes, and the memory row of each memory node :math:`(U,)`.
    """
    for name, value in (("k", k), ("memory_k", k if memory_k is None else memory_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"knn_memory_pairs needs a positive int number of neighbours {name}, got {value!r}"
            )
    if memory_z.dim() != 2 or memory_z.size(1) != z.size(1) or memory_y.shape != memory_z.shape[:1]:
        raise ValueError(
            f"knn_memory_pairs expects memory embeddings [M, {z.size(1)}] and labels [M], got "
            f"{tuple(memory_z.shape)} and {tuple(memory_y.shape)}"
        )
    layout = class_layout(y)
    num_nodes, device = z.size(0), z.device
    candidates = (~torch.isin(memory_y, y)).nonzero().view(-1)
    unit = F.normalize(z.detach().float(), dim=1)
    pool = torch.cat([unit, F.normalize(memory_z[candidates].detach().float(), dim=1)])
    similarity = unit @ pool.T
    nodes = torch.arange(num_nodes, device=device)
    similarity[nodes, nodes] = -math.inf
    similarity = similarity.nan_to_num(nan=-math.inf)
    if memory_k is None:
        best, found = similarity.topk(min(k, pool.size(0) - 1), dim=1)
    else:
        in_batch = similarity[:, :num_nodes].topk(min(k, num_nodes - 1), dim=1)
        in_memory = similarity[:, num_nodes:].topk(min(memory_k, candidates.numel()), dim=1)
        best = torch.cat([in_batch.values, in_memory.values], dim=1)
        found = torch.cat([in_batch.indices, num_nodes + in_memory.indices], dim=1)
    valid = best > -math.inf
    source, target = nodes.unsqueeze(1).expand_as(found)[valid], found[valid]  # nearest first

    # At most K memory entries of a class beside each batch node, the nearest.
    from_memory = target >= num_nodes
    hit_label = memory_y[candidates[target[from_memory] - num_nodes]]
    _, key = torch.unique(torch.stack([source[from_memory], hit_label]), dim=1, return_inverse=True)
    order = torch.sort(key, stable=True).indices  # nearest first within each key
    sorted_key = key[order]
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=device) - torch.searchsorted(
        sorted_key, sorted_key
    )
    keep = torch.ones_like(from_memory)
    keep[from_memory] = rank < layout.samples_per_class
    source, target = source[keep], target[keep]

    chosen = torch.unique(target[target >= num_nodes])  # ascending: memory order
    memory_index = candidates[chosen - num_nodes]
    node = torch.cat([nodes, torch.full_like(candidates, -1)])
    node[chosen] = num_nodes + torch.arange(chosen.numel(), device=device)
    target = node[target]
    memory_nodes = num_nodes + torch.arange(chosen.numel(), device=device)
    selected = MemoryNodes.select(memory_z, memory_y, memory_index, layout.num_classes)
    mate_source, mate_target = _classmates(layout.class_index)
    pairs = _block_ordered(
        torch.cat([source, mate_source, memory_nodes]),
        torch.cat([target, mate_target, memory_nodes]),
        torch.cat([layout.class_index, selected.class_index]),
    )
    return pairs, memory_index
