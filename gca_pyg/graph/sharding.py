"""The split of a batch graph's undirected pairs between processes.

Several processes share one batch graph by splitting its undirected pairs: :func:`shard_pairs`
gives each process whole blocks of class pairs, so every (anchor, class) group that synthesis needs
lies on one process.

On the sparse graph (``graph.neighbors: k``, the pairs of :mod:`gca_pyg.graph.neighbors`),
:func:`sparse_shard` derives the (anchor, class) groups of those pairs, memory nodes
(:class:`~gca_pyg.graph.memory_nodes.MemoryNodes`) included, and splits them likewise.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from gca_pyg.graph.memory_nodes import MemoryNodes
from gca_pyg.layout import ClassLayout

__all__ = ["EdgeShard", "shard_pairs", "sparse_shard"]


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
