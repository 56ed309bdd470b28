"""Mini-batch → correlation graph (docs/method.md, "The batch graph").

Every sample of a batch becomes a node; every ordered pair of samples (self-loops included)
becomes an edge that carries the per-channel correlation of the two embeddings. The complete graph
is symmetric (``e_ij = e_ji``), so it can also be stored *undirected*: one row per unordered pair
``{i, j}``, which halves the edge work of :class:`~gca_pyg.nn.CorrelationNet` exactly.

:class:`BatchGraph` is what one training step knows of its batch: the labels, their class layout,
this process's pairs and groups, and the process group. It is built once per step
(:meth:`BatchGraph.build`) and read by the generator and the losses.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch_geometric.data import Data

from gca_pyg.distributed import all_reduce_sum, broadcast_tensor, rank_and_size
from gca_pyg.graph.memory_nodes import MemoryNodes
from gca_pyg.graph.neighbors import knn_memory_pairs, knn_pairs
from gca_pyg.graph.sharding import EdgeShard, shard_pairs, sparse_shard
from gca_pyg.layout import ClassLayout, class_layout
from gca_pyg.utils import correlation_edge_features, gather_rows

__all__ = [
    "BatchGraph",
    "build_batch_graph",
    "complete_edge_index",
    "pair_index",
    "to_dense_edges",
]


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
