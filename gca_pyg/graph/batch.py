"""Mini-batch → correlation graph (docs/method.md, "The batch graph").

Every sample of a batch becomes a node; every ordered pair of samples (self-loops included)
becomes an edge that carries the per-channel correlation of the two embeddings. The complete graph
is symmetric (``e_ij = e_ji``), so it can also be stored *undirected*: one row per unordered pair
``{i, j}``, which halves the edge work of :class:`~gca_pyg.nn.CorrelationNet` exactly.

Several processes share one batch graph by splitting its undirected pairs: :func:`shard_pairs`
gives each process whole blocks of class pairs, so every (anchor, class) group that synthesis needs
lies on one process.

For large batches the graph can be sparse (``graph.neighbors: k``): :func:`knn_pairs` keeps each
node's :math:`k` most similar samples and all of its classmates, and :func:`sparse_shard` derives
the (anchor, class) groups of those pairs.

Past embeddings can join the sparse graph as *memory nodes* (``graph.memory: M``, a
:class:`~gca_pyg.memory.EmbeddingMemory`): :func:`knn_memory_pairs` searches each batch node's
:math:`k` nearest among the batch and the memory entries of classes the batch does not hold, and
the memory entries found become extra nodes (:class:`MemoryNodes`), joined to the batch nodes that
found them. They are never anchors; their classes become groups of synthesis.

:class:`BatchGraph` is what one training step knows of its batch: the labels, their class layout,
this process's pairs and groups, and the process group. It is built once per step
(:meth:`BatchGraph.build`) and read by the generator and the losses.
"""

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Optional

import faiss
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch_geometric.data import Data

from gca_pyg.distributed import all_reduce_sum, broadcast_tensor, rank_and_size
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.nn.edge_node_conv import correlation_edge_features
from gca_pyg.utils import gather_rows

__all__ = [
    "BatchGraph",
    "EdgeShard",
    "GraphConfig",
    "MemoryNodes",
    "build_batch_graph",
    "complete_edge_index",
    "knn_memory_pairs",
    "knn_pairs",
    "pair_index",
    "shard_pairs",
    "sparse_shard",
    "to_dense_edges",
]


@dataclass
class GraphConfig:
    """The batch graph: complete (``neighbors: null``), or each node joined to its ``neighbors``
    most similar samples and to its classmates (:func:`knn_pairs`), for large batches; with
    ``memory: M`` (needs ``neighbors``) the last :math:`M` training embeddings are searched too and
    join the graph as memory nodes (:func:`knn_memory_pairs`) after ``memory_start`` epochs."""

    neighbors: Optional[int] = None
    memory: int = 0  # embeddings kept from past batches; 0: no memory
    memory_start: int = 0  # epochs before the memory is filled and read
    # neighbours of a batch node searched in the memory apart from its `neighbors` in the batch;
    # null: one search of `neighbors` over batch and memory together
    memory_neighbors: Optional[int] = None


def complete_edge_index(
    num_nodes: int, *, undirected: bool = False, device: Optional[torch.device] = None
) -> Tensor:
    r"""Edge indices of the complete graph with self-loops.

    Args:
        num_nodes (int): Number of nodes :math:`N`.
        undirected (bool, optional): If :obj:`False`, all :math:`N^2` ordered pairs, row-major
            (edge ``i * N + j`` is :math:`i \to j`). If :obj:`True`, the :math:`N(N+1)/2` unordered
            pairs :math:`\{i, j\}`, :math:`i \le j`, in row-major order of the upper triangle.
            (default: :obj:`False`)
        device (torch.device, optional): Device of the result. (default: :obj:`None`)

    Returns:
        LongTensor of shape :math:`(2, |\mathcal{E}|)`; row 0 holds sources, row 1 targets.
    """
    if undirected:
        return torch.triu_indices(num_nodes, num_nodes, device=device)
    nodes = torch.arange(num_nodes, device=device)
    return torch.stack([nodes.repeat_interleave(num_nodes), nodes.repeat(num_nodes)])


def pair_index(edge_index: Tensor, num_nodes: int, *, undirected: bool = False) -> Tensor:
    r"""Dense lookup table from node pairs to edge rows.

    Returns a LongTensor ``table`` of shape :math:`(N, N)` with ``table[i, j]`` the row of the edge
    :math:`i \to j` in :obj:`edge_index` (or of the unordered pair :math:`\{i, j\}` if
    :obj:`undirected`), and ``-1`` where there is no such edge.
    """
    table = torch.full((num_nodes, num_nodes), -1, dtype=torch.long, device=edge_index.device)
    rows = torch.arange(edge_index.size(1), device=edge_index.device)
    table[edge_index[0], edge_index[1]] = rows
    if undirected:
        table[edge_index[1], edge_index[0]] = rows
    return table


def to_dense_edges(
    edge_values: Tensor, edge_index: Tensor, num_nodes: int, *, undirected: bool = False
) -> Tensor:
    r"""Scatters per-edge values of a complete graph into a dense :math:`(N, N, \ast)` tensor.

    ``out[i, j]`` is the value of edge :math:`i \to j` (for :obj:`undirected` storage, of the pair
    :math:`\{i, j\}`, so ``out`` is symmetric in its first two dimensions). Differentiable.

    Raises:
        ValueError: If some ordered pair has no edge.
    """
    table = pair_index(edge_index, num_nodes, undirected=undirected)
    if bool((table < 0).any()):
        raise ValueError(
            f"to_dense_edges needs a complete graph on {num_nodes} nodes, but some node pairs have "
            "no edge; build it with build_batch_graph or complete_edge_index."
        )
    return gather_rows(edge_values, table)


def build_batch_graph(
    z: Tensor,
    y: Tensor,
    *,
    undirected: bool = False,
    edge_index: Optional[Tensor] = None,
    neighbors: Optional[int] = None,
    eps: float = 1e-12,
) -> Data:
    r"""Builds the correlation graph of a mini-batch (docs/method.md, "The batch graph").

    The nodes carry the embeddings :math:`\mathbf{z}_i` themselves. For the edges each embedding is
    centred by its own channel mean, :math:`\mathbf{x}_i = \mathbf{z}_i -
    \mathrm{mean}_c(z_{i,c})`, and every pair of nodes is joined by an edge carrying the per-channel
    correlation

    .. math::
        \mathbf{e}_{ij} = \frac{\mathbf{x}_i \odot \mathbf{x}_j}{\lVert\mathbf{x}_i\rVert\,
        \lVert\mathbf{x}_j\rVert} \in \mathbb{R}^D,
        \qquad \sum_c e_{ij,c} = \mathrm{Pearson}(\mathbf{z}_i, \mathbf{z}_j).

    Args:
        z (torch.Tensor): Embeddings of shape :math:`(N, D)`.
        y (torch.Tensor): Labels of shape :math:`(N,)`.
        undirected (bool, optional): Store each unordered pair once (:math:`N(N+1)/2` edges, see
            :func:`complete_edge_index`) instead of all :math:`N^2` ordered pairs. Pass the same
            flag to :class:`~gca_pyg.nn.CorrelationNet`. (default: :obj:`False`)
        edge_index (torch.Tensor, optional): The pairs to build, :math:`(2, |\mathcal{E}|)`, e.g.
            one process's share from :func:`shard_pairs`; the complete graph if omitted.
            (default: :obj:`None`)
        neighbors (int, optional): Build the sparse graph of :func:`knn_pairs` instead: each node
            joined to its :obj:`neighbors` most similar samples and to its classmates.
            (default: :obj:`None`)
        eps (float, optional): Lower bound of the norms, so that a constant embedding gives zero
            correlations instead of NaN. (default: :obj:`1e-12`)

    Returns:
        :class:`torch_geometric.data.Data` with ``x`` :math:`(N, D)` the embeddings :obj:`z`,
        ``edge_index`` :math:`(2, |\mathcal{E}|)`, ``edge_attr`` :math:`(|\mathcal{E}|, D)`,
        ``neg_mask`` :math:`(|\mathcal{E}|,)` bool, True where the two labels differ, and ``y``.
        Differentiable with respect to :obj:`z`.
    """
    if z.dim() != 2:
        raise ValueError(
            f"build_batch_graph expects embeddings of shape [N, D], got {tuple(z.shape)}"
        )
    if y.dim() != 1 or y.numel() != z.size(0):
        raise ValueError(
            f"build_batch_graph expects one label per embedding: z has {z.size(0)} rows, "
            f"y has shape {tuple(y.shape)}"
        )
    num_nodes = z.size(0)
    if neighbors is not None:
        if edge_index is not None:
            raise ValueError("build_batch_graph takes edge_index or neighbors, not both")
        edge_index = knn_pairs(z, y, neighbors)
        if not undirected:  # both directions of every pair, a self-loop once
            mirrored = edge_index[0] != edge_index[1]
            edge_index = torch.cat([edge_index, edge_index[:, mirrored].flip(0)], dim=1)
    elif edge_index is None:
        edge_index = complete_edge_index(num_nodes, undirected=undirected, device=z.device)
    source, target = edge_index
    edge_attr = correlation_edge_features(z, edge_index, eps)
    neg_mask = y[source] != y[target]
    return Data(
        x=z, edge_index=edge_index, edge_attr=edge_attr, neg_mask=neg_mask, y=y, num_nodes=num_nodes
    )


@dataclass(frozen=True)
class EdgeShard:
    """One process's share of the undirected pairs of a class-balanced batch graph.

    The pairs come in blocks: the :math:`K^2` pairs joining two classes, or the :math:`K(K+1)/2`
    pairs within one class. A shard holds whole blocks, so for every anchor of a block's classes
    it holds all :math:`K` edges to the other class of the block (or its own): one *group*, which is
    what synthesis merges into one synthetic sample.

    A sparse graph (:func:`sparse_shard`) has a group for every (anchor, class) that the anchor is
    joined to by at least one stored pair, and :attr:`mask` says which of the class's :math:`K`
    samples are joined to it.

    Attributes:
        edge_index: The stored pairs :math:`(2, E_r)`, undirected storage (each pair once).
        anchor: The anchor node of every group, :math:`(G_r,)`.
        target_class: The class of every group, as a row of :attr:`ClassLayout.classes`,
            :math:`(G_r,)`; equal to the anchor's class for the groups of same-class blocks.
        edges: For every group, the rows of :attr:`edge_index` joining its anchor to the
            :math:`K` samples of its class in batch order, :math:`(G_r, K)` (0 where
            :attr:`mask` is False).
        mask: Bool :math:`(G_r, K)`, True where the anchor and the sample are a stored pair;
            :obj:`None` for the complete graph, where all are.
        members: The node of each of a group's :math:`K` slots, :math:`(G_r, K)`, on a graph
            with memory nodes (:func:`knn_memory_pairs`), whose classes have no batch samples;
            :obj:`None` otherwise, where slot :math:`k` of class :math:`c` is its sample :math:`k`
            in batch order (``layout.members[c, k]``).
    """

    edge_index: Tensor
    anchor: Tensor
    target_class: Tensor
    edges: Tensor
    mask: Optional[Tensor] = None
    members: Optional[Tensor] = None

    @property
    def num_edges(self) -> int:
        return self.edge_index.size(1)

    @property
    def num_groups(self) -> int:
        return self.anchor.numel()


def shard_pairs(layout: ClassLayout, rank: int = 0, world_size: int = 1) -> EdgeShard:
    r"""Splits the undirected pairs of a class-balanced batch between `world_size` processes.

    The :math:`C(C+1)/2` blocks of class pairs :math:`\{a, b\}`, :math:`a \le b`, are cut into
    `world_size` contiguous runs of about equal edge counts; process `rank` stores its run. With one
    process the shard is the complete graph (every pair once, self-loops included).

    Args:
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`.
        rank: This process's rank. (default: :obj:`0`)
        world_size: The number of processes. (default: :obj:`1`)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    slots = _block_slots(
        layout.num_classes, layout.samples_per_class, rank, world_size, str(layout.members.device)
    )
    edge_slots, anchor_slots, target_class, edges = slots
    nodes = layout.members.reshape(-1)
    return EdgeShard(
        edge_index=nodes[edge_slots],
        anchor=nodes[anchor_slots],
        target_class=target_class,
        edges=edges,
    )


def _block_owner(block_edges: Tensor, world_size: int) -> Tensor:
    """The process of each block in a run of blocks with these edge counts: `world_size`
    contiguous runs of about equal edge counts, each block going where its middle falls."""
    start = torch.cumsum(block_edges, 0) - block_edges
    total = max(int(block_edges.sum()), 1)
    return (((2 * start + block_edges) * world_size) // (2 * total)).clamp_max(world_size - 1)


def _pair_block(class_a: Tensor, class_b: Tensor, num_classes: int) -> Tensor:
    """The block of each pair of classes, numbered in storage order: the blocks of two classes
    :math:`a < b` (by :math:`a C + b`), then those within one class."""
    low, high = torch.minimum(class_a, class_b), torch.maximum(class_a, class_b)
    return torch.where(low < high, low * num_classes + high, num_classes * num_classes + low)


@lru_cache(maxsize=32)
def _block_slots(
    num_classes: int, samples: int, rank: int, world_size: int, device: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`shard_pairs` in terms of slots ``class_row * K + k``; depends on sizes only."""
    device = torch.device(device)
    first, second = torch.triu_indices(num_classes, num_classes, device=device)
    same = first == second
    block_edges = torch.where(same, samples * (samples + 1) // 2, samples * samples)
    mine = _block_owner(block_edges, world_size) == rank
    first, second, same = first[mine], second[mine], same[mine]

    k = torch.arange(samples, device=device)
    # Between two classes: all K x K pairs, row p * K + q joins sample p of a to sample q of b.
    cross_a, cross_b = first[~same], second[~same]
    num_cross = cross_a.numel()
    cross_base = torch.arange(num_cross, device=device) * samples * samples
    p, q = k.repeat_interleave(samples), k.repeat(samples)
    cross_edges = torch.stack(
        [(cross_a * samples).unsqueeze(1) + p, (cross_b * samples).unsqueeze(1) + q]
    ).reshape(2, -1)
    # Within a class: the pairs p <= q, row t of triu_indices(K, K).
    within = first[same]
    tri_p, tri_q = torch.triu_indices(samples, samples, device=device)
    within_base = (
        num_cross * samples * samples + torch.arange(within.numel(), device=device) * tri_p.numel()
    )
    within_edges = torch.stack(
        [(within * samples).unsqueeze(1) + tri_p, (within * samples).unsqueeze(1) + tri_q]
    ).reshape(2, -1)
    edge_slots = torch.cat([cross_edges, within_edges], dim=1)

    # Groups: (anchor slot, target class, K edge rows).
    rows = cross_base.view(-1, 1, 1) + (k.view(-1, 1) * samples + k.view(1, -1))  # [block, p, q]
    anchors_a = (cross_a * samples).unsqueeze(1) + k  # [block, p]
    anchors_b = (cross_b * samples).unsqueeze(1) + k  # [block, q]
    triangle = torch.empty(samples, samples, dtype=torch.long, device=device)
    triangle[tri_p, tri_q] = torch.arange(tri_p.numel(), device=device)
    triangle[tri_q, tri_p] = torch.arange(tri_p.numel(), device=device)
    within_rows = within_base.view(-1, 1, 1) + triangle  # [block, p, q]
    anchor_slots = torch.cat(
        [
            anchors_a.reshape(-1),
            anchors_b.reshape(-1),
            ((within * samples).unsqueeze(1) + k).reshape(-1),
        ]
    )
    target_class = torch.cat(
        [
            cross_b.repeat_interleave(samples),
            cross_a.repeat_interleave(samples),
            within.repeat_interleave(samples),
        ]
    )
    edges = torch.cat(
        [
            rows.reshape(-1, samples),
            rows.transpose(1, 2).reshape(-1, samples),
            within_rows.reshape(-1, samples),
        ]
    )
    return edge_slots, anchor_slots, target_class, edges


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


@dataclass(frozen=True)
class MemoryNodes:
    r"""The memory entries that joined one step's batch graph, as nodes :math:`N \dots N + U - 1`
    after the batch's :math:`N` (:func:`knn_memory_pairs`).

    Attributes:
        embeddings: Their embeddings, detached, :math:`(U, D)`.
        labels: Their labels, :math:`(U,)`; none of them is a label of the batch.
        index: Their rows in the memory, ascending, :math:`(U,)`.
        classes: Their distinct labels, ascending, :math:`(C_m,)`: the *memory classes*, which
            follow the batch's :math:`C` classes as class rows :math:`C \dots C + C_m - 1`.
        class_index: The class row of each, :math:`C + ` its row in :attr:`classes`, :math:`(U,)`.
    """

    embeddings: Tensor
    labels: Tensor
    index: Tensor
    classes: Tensor
    class_index: Tensor

    @classmethod
    def select(
        cls, memory_embeddings: Tensor, memory_labels: Tensor, index: Tensor, num_batch_classes: int
    ) -> "MemoryNodes":
        """The memory rows `index` as nodes of a graph whose batch has `num_batch_classes`."""
        labels = memory_labels[index]
        classes, inverse = torch.unique(labels, return_inverse=True)
        return cls(
            embeddings=memory_embeddings[index].detach(),
            labels=labels,
            index=index,
            classes=classes,
            class_index=num_batch_classes + inverse,
        )

    @property
    def num_nodes(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return self.classes.numel()


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


def sparse_shard(
    layout: ClassLayout,
    edge_index: Tensor,
    rank: int = 0,
    world_size: int = 1,
    *,
    memory: Optional[MemoryNodes] = None,
) -> EdgeShard:
    r"""The (anchor, class) groups of a sparse batch graph, for synthesis on its stored pairs.

    Every stored pair :math:`\{i, j\}` joins anchor :math:`i` to a sample of class :math:`y_j` and
    anchor :math:`j` to one of class :math:`y_i`. Each (anchor, class) with at least one such pair
    is a group; its :attr:`EdgeShard.edges` hold the rows of the pairs joining the anchor to the
    class's :math:`K` samples in batch order, and :attr:`EdgeShard.mask` which of them are
    stored. Groups come in the order of :func:`shard_pairs`, so on the complete graph (pairs in
    its order, e.g. from :func:`knn_pairs` with :math:`k \ge N - 1`) every field equals
    ``shard_pairs(layout)``'s and the mask is all True.

    With `memory` (the pairs of :func:`knn_memory_pairs`), memory nodes are members, never
    anchors: a memory class joined to anchor :math:`i` is a group whose members are the memory
    nodes joined to :math:`i`, in node order (at most :math:`K`), named in
    :attr:`EdgeShard.members`.

    Several processes split the pairs as :func:`shard_pairs` splits the complete graph: the blocks
    of pairs joining two classes (or one class) are cut into `world_size` contiguous runs of about
    equal edge counts, and process `rank` keeps its run and the groups of its blocks, so every group
    lies whole on one process. All processes must pass the same pairs.

    Args:
        layout: The batch's :class:`~gca_pyg.layout.ClassLayout`.
        edge_index: Undirected pairs :math:`(2, |\mathcal{E}|)`, each once, in the block order of
            :func:`knn_pairs` (which gives them so).
        rank: This process's rank. (default: :obj:`0`)
        world_size: The number of processes. (default: :obj:`1`)
        memory: The graph's memory nodes, :math:`N \dots`, if any. (default: :obj:`None`)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    num_classes, samples = layout.num_classes, layout.samples_per_class
    num_anchors = layout.class_index.numel()
    node_class = layout.class_index
    if memory is not None:
        node_class = torch.cat([node_class, memory.class_index])
        num_classes += memory.num_classes
    if world_size > 1:
        block = _pair_block(node_class[edge_index[0]], node_class[edge_index[1]], num_classes)
        blocks, block_edges = torch.unique_consecutive(block, return_counts=True)
        if blocks.numel() > 1 and not bool((blocks[1:] > blocks[:-1]).all()):
            raise ValueError(
                "sparse_shard splits pairs between processes by class-pair block: pass them in "
                "the block order of knn_pairs"
            )
        edge_index = edge_index[
            :, (_block_owner(block_edges, world_size) == rank).repeat_interleave(block_edges)
        ]
    source, target = edge_index
    mirrored = source != target
    rows = torch.arange(edge_index.size(1), device=edge_index.device)
    anchor = torch.cat([source, target[mirrored]])  # every stored direction anchor -> member
    member = torch.cat([target, source[mirrored]])
    row = torch.cat([rows, rows[mirrored]])
    if memory is not None:  # a memory node is never an anchor
        from_batch = anchor < num_anchors
        anchor, member, row = anchor[from_batch], member[from_batch], row[from_batch]
    anchor_class, member_class = node_class[anchor], node_class[member]
    low, high = torch.minimum(anchor_class, member_class), torch.maximum(anchor_class, member_class)
    cross_block = low * num_classes - low * (low + 1) // 2 + high - low - 1  # rank of a < b
    num_cross = num_classes * (num_classes - 1) // 2
    anchor_position = layout.position[anchor]
    # The group order of shard_pairs: anchors of the lower class of each cross block, anchors of
    # the higher class, then the same-class groups.
    key = torch.where(
        anchor_class < member_class,
        cross_block * samples + anchor_position,
        torch.where(
            anchor_class > member_class,
            (num_cross + cross_block) * samples + anchor_position,
            2 * num_cross * samples + anchor_class * samples + anchor_position,
        ),
    )
    groups, group_of = torch.unique(key, return_inverse=True)
    num_groups = groups.numel()
    if memory is None:
        slot = layout.position[member]
    else:  # a memory member's slot: its rank among the group's memory members, in node order
        in_memory = member >= num_anchors
        slot = layout.position[member.clamp_max(num_anchors - 1)]
        code = group_of[in_memory] * node_class.numel() + member[in_memory]
        ordered = torch.sort(code).values
        group_start = torch.searchsorted(ordered, group_of[in_memory] * node_class.numel())
        slot[in_memory] = torch.searchsorted(ordered, code) - group_start
        if bool((slot >= samples).any()):
            raise ValueError(
                f"sparse_shard takes at most K = {samples} memory members per (anchor, class) "
                "group, as knn_memory_pairs keeps them"
            )
    edges = torch.zeros(num_groups, samples, dtype=torch.long, device=edge_index.device)
    mask = torch.zeros(num_groups, samples, dtype=torch.bool, device=edge_index.device)
    edges[group_of, slot] = row
    mask[group_of, slot] = True
    group_anchor = torch.empty(num_groups, dtype=torch.long, device=edge_index.device)
    group_class = torch.empty_like(group_anchor)
    group_anchor[group_of] = anchor
    group_class[group_of] = member_class
    members = None
    if memory is not None:
        members = torch.zeros_like(edges)
        members[group_of, slot] = member
    return EdgeShard(
        edge_index=edge_index,
        anchor=group_anchor,
        target_class=group_class,
        edges=edges,
        mask=mask,
        members=members,
    )


@dataclass(frozen=True)
class BatchGraph:
    r"""What one training step knows of its class-balanced batch: its labels and
    :class:`~gca_pyg.layout.ClassLayout`, the pairs and (anchor, class) groups this process
    stores (:class:`EdgeShard`), the memory nodes that joined it, and the process group over which
    the graph is split.

    Built once per step by :meth:`build` and read by the generator
    (:class:`~gca_pyg.generator.HardNegativeGenerator`) and the losses (:mod:`gca_pyg.losses`).
    The process group is bound here, once: every sum over the graph's pairs or groups is combined
    over its processes.

    Attributes:
        labels: The labels of the whole batch, :math:`(N,)`.
        layout: Their class layout (:math:`C` classes of :math:`K` samples).
        shard: This process's pairs and groups: the whole complete graph for one process
            (:func:`shard_pairs`), or its share of a sparse graph (:func:`sparse_shard`).
        process_group: The processes that share the graph, or :obj:`None` for one process.
        memory: The memory nodes :math:`N \dots N + U - 1` (:class:`MemoryNodes`), or :obj:`None`.
    """

    labels: Tensor
    layout: ClassLayout
    shard: EdgeShard
    process_group: Optional[ProcessGroup] = None
    memory: Optional[MemoryNodes] = None

    @classmethod
    def build(
        cls,
        labels: Tensor,
        embeddings: Optional[Tensor] = None,
        *,
        neighbors: Optional[int] = None,
        process_group: Optional[ProcessGroup] = None,
        memory: Optional[tuple[Tensor, Tensor]] = None,
        memory_neighbors: Optional[int] = None,
    ) -> "BatchGraph":
        """The batch graph of a class-balanced batch: complete, or with `neighbors` the sparse
        graph of :func:`knn_pairs` on `embeddings` (searched by rank 0 and broadcast, so that every
        process splits the same pairs), or with `memory` too that of :func:`knn_memory_pairs`.

        Args:
            labels: The labels of the whole batch (every process's, in rank order).
            embeddings: The embeddings of the whole batch; needed with `neighbors` only.
            neighbors: ``graph.neighbors``: :obj:`None` for the complete graph.
            process_group: The processes that share the graph.
            memory: Past embeddings and their labels, ``(M, D)`` and ``(M,)``, the same on every
                process (:meth:`EmbeddingMemory.contents
                <gca_pyg.memory.EmbeddingMemory.contents>`); needs `neighbors`.
            memory_neighbors: ``graph.memory_neighbors``: ``memory_k`` of
                :func:`knn_memory_pairs`.

        Raises:
            ValueError: If the batch is not class-balanced, or `neighbors` comes without
                `embeddings`, or `memory` without `neighbors`.
        """
        layout = class_layout(labels)
        rank, world_size = rank_and_size(process_group)
        if neighbors is None:
            if memory is not None:
                raise ValueError(
                    "BatchGraph.build takes memory nodes on the sparse graph only: set "
                    "graph.neighbors (the complete graph over batch and memory would grow as "
                    "(N + M)^2)"
                )
            shard = shard_pairs(layout, rank, world_size)
            return cls(labels=labels, layout=layout, shard=shard, process_group=process_group)
        if embeddings is None:
            raise ValueError(
                "BatchGraph.build needs the batch's embeddings to build the sparse graph of "
                "graph.neighbors"
            )
        nodes = None
        empty = torch.empty(2, 0, dtype=torch.long, device=labels.device)
        if memory is None or memory[1].numel() == 0:
            pairs = knn_pairs(embeddings, labels, neighbors) if rank == 0 else empty
        else:
            memory_embeddings, memory_labels = memory
            pairs, chosen = (
                knn_memory_pairs(
                    embeddings,
                    labels,
                    neighbors,
                    memory_embeddings,
                    memory_labels,
                    memory_neighbors,
                )
                if rank == 0
                else (empty, empty[0])
            )
            chosen = broadcast_tensor(chosen, process_group)
            if chosen.numel():
                nodes = MemoryNodes.select(
                    memory_embeddings, memory_labels, chosen, layout.num_classes
                )
        pairs = broadcast_tensor(pairs, process_group)
        shard = sparse_shard(layout, pairs, rank, world_size, memory=nodes)
        return cls(
            labels=labels, layout=layout, shard=shard, process_group=process_group, memory=nodes
        )

    @property
    def num_nodes(self) -> int:
        """:math:`N`, the batch's nodes: the anchors (memory nodes not counted)."""
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        """:math:`C`, the classes of the batch, plus the memory classes if any."""
        return self.layout.num_classes + (0 if self.memory is None else self.memory.num_classes)

    @property
    def classes(self) -> Tensor:
        """The label of each class row: the batch's classes, then the memory classes."""
        if self.memory is None:
            return self.layout.classes
        return torch.cat([self.layout.classes, self.memory.classes])

    @property
    def is_sparse(self) -> bool:
        """Whether some (anchor, sample) pairs are missing (``graph.neighbors``)."""
        return self.shard.mask is not None

    def node_embeddings(self, embeddings: Tensor) -> Tensor:
        r"""The features of every node: the batch's `embeddings`, then the memory nodes', each
        at the batch's mean norm: :math:`\hat{\mathbf{m}}\,\mathrm{mean}_i
        \lVert\mathbf{z}_i\rVert` (a constant of the step, without gradient).

        A stored embedding keeps the norm it had when it was stored, while the losses compare raw
        inner products: a fixed norm would let the metric loss fall by growing every embedding
        (:math:`\mathbf{a}^\top\mathbf{p}` grows with the square of the scale,
        :math:`\mathbf{a}^\top\mathbf{m}` only linearly). Its direction is what the memory
        keeps."""
        if self.memory is None:
            return embeddings
        scale = torch.linalg.vector_norm(embeddings.detach(), dim=1).mean()
        memory = F.normalize(self.memory.embeddings.to(embeddings.dtype), dim=1) * scale
        return torch.cat([embeddings, memory])

    def data(self, embeddings: Tensor) -> Data:
        """The stored pairs' graph of `embeddings` (and of the memory nodes) for
        :class:`~gca_pyg.nn.CorrelationNet` (:func:`build_batch_graph`, undirected storage)."""
        labels = (
            self.labels if self.memory is None else torch.cat([self.labels, self.memory.labels])
        )
        return build_batch_graph(
            self.node_embeddings(embeddings),
            labels,
            undirected=True,
            edge_index=self.shard.edge_index,
        )

    @cached_property
    def connected(self) -> Optional[Tensor]:
        """Bool :math:`(N, C)`: True where anchor :math:`i` has a group of class :math:`c` on any
        process; :obj:`None` on the complete graph, where every anchor has every class."""
        if not self.is_sparse:
            return None
        shard, num_classes = self.shard, self.num_classes
        table = torch.zeros(
            self.num_nodes * num_classes, dtype=torch.int32, device=shard.anchor.device
        )
        table[shard.anchor * num_classes + shard.target_class] = 1
        return (all_reduce_sum(table, self.process_group) > 0).view(self.num_nodes, num_classes)

    @cached_property
    def total_groups(self) -> int:
        """The number of (anchor, class) groups over all processes (:math:`N C` when complete)."""
        if not self.is_sparse:
            return self.num_nodes * self.num_classes
        count = torch.tensor(self.shard.num_groups, device=self.shard.anchor.device)
        return int(all_reduce_sum(count, self.process_group))
