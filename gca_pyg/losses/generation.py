"""The generator's own losses: a synthetic sample must still read as its class
(:func:`synthetic_class_loss`, :math:`J_{ce}`), a negative must lie close to its anchor
(:func:`similarity_loss`, :math:`J_{sim}`), and fusion weights must be diverse
(:func:`diversity_loss`, :math:`J_{div}`)."""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.distributed import all_reduce_sum
from gca_pyg.graph import BatchGraph
from gca_pyg.synthesis import SyntheticSamples
from gca_pyg.utils import gather_rows

__all__ = ["synthetic_class_loss", "similarity_loss", "diversity_loss"]


def _global_mean(values: Tensor, process_group) -> Tensor:
    """The mean of `values` over every process's rows."""
    count = torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)
    return all_reduce_sum(values.sum(), process_group) / all_reduce_sum(count, process_group)


def synthetic_class_loss(
    synthetic: SyntheticSamples,
    graph: BatchGraph,
    classifier: Callable[[Tensor], Tensor],
    scale: float = 20.0,
) -> Tensor:
    r""":math:`J_{ce} = s \cdot \mathrm{CE}(W_s \tilde{\mathbf{n}}, c)`: a synthetic sample must
    still be classified as the class it stands for (mean over the rows of all processes)."""
    losses = F.cross_entropy(
        classifier(synthetic.embeddings), synthetic.labels(graph.classes), reduction="none"
    )
    return scale * _global_mean(losses, graph.process_group)


def similarity_loss(embeddings: Tensor, synthetic: SyntheticSamples, graph: BatchGraph) -> Tensor:
    r""":math:`J_{sim}`: mean of :math:`1 - \cos(\mathbf{a}, \tilde{\mathbf{n}})` over all
    :math:`N \cdot C` (anchor, class) pairs, the :math:`N` same-class pairs counting as 0 (the
    reference's intent; its mask zeroes other entries by mistake).

    On a sparse batch graph the sum runs over the (anchor, other class) groups present and is
    divided by the number of groups present, same-class ones included
    (:attr:`BatchGraph.total_groups <gca_pyg.graph.BatchGraph.total_groups>`), which is
    :math:`N \cdot C` on the complete graph.

    Args:
        embeddings: The anchors' batch :math:`(N, D)`.
        synthetic: This process's synthetic samples.
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`.
    """
    distance = 1.0 - F.cosine_similarity(
        gather_rows(embeddings, synthetic.anchor), synthetic.embeddings, dim=-1
    )
    distance = torch.where(synthetic.is_negative(graph.layout), distance, 0.0)
    return all_reduce_sum(distance.sum(), graph.process_group) / graph.total_groups


def diversity_loss(
    fusion_weights: Tensor, graph: BatchGraph, scale: float = 0.01, eps: float = 1e-12
) -> Tensor:
    r""":math:`J_{div} = s \big(1 - \sqrt{\textstyle\sum_{ij} \lVert \boldsymbol{\lambda}_{ij} -
    \mathrm{mean}_{j'} \boldsymbol{\lambda}_{ij'} \rVert^2 / N^2}\big)` over the complete graph:
    rewards fusion weights that vary over each anchor's edges.

    Over the pairs of a sparse graph, :math:`j` and :math:`j'` run over the stored neighbours
    :math:`\mathcal{N}(i)` of :math:`i` (itself included), so the row mean is over
    :math:`|\mathcal{N}(i)|` weights and :math:`N^2` becomes the number of stored directed pairs
    :math:`\sum_i |\mathcal{N}(i)|`; on the complete graph both are the terms above. Memory nodes
    (:attr:`BatchGraph.memory <gca_pyg.graph.BatchGraph.memory>`) are never anchors: :math:`i`
    runs over the batch, and :math:`\mathcal{N}(i)` includes the memory nodes joined to it.

    Args:
        fusion_weights: The weights of the graph's stored undirected pairs, :math:`(E, D)` (each
            pair stands for both directions).
        graph: The step's :class:`~gca_pyg.graph.BatchGraph`; the sums run over the pairs of all
            its processes.
        scale: :math:`s`.
        eps: Floor under the square root, so its gradient stays finite.
    """
    process_group, num_anchors = graph.process_group, graph.num_nodes
    num_nodes = num_anchors + (0 if graph.memory is None else graph.memory.num_nodes)
    source, target = graph.shard.edge_index
    mirrored = source != target
    loops = (~mirrored).nonzero().view(-1)  # a self-loop stands once: take it back once
    sums = torch.zeros(
        num_nodes, fusion_weights.size(1), dtype=fusion_weights.dtype, device=fusion_weights.device
    )
    sums = sums.index_add(0, source, fusion_weights).index_add(0, target, fusion_weights)
    sums = sums.index_add(0, source[loops], gather_rows(fusion_weights, loops), alpha=-1)
    degree = torch.bincount(source, minlength=num_nodes) + torch.bincount(
        target[mirrored], minlength=num_nodes
    )
    degree = all_reduce_sum(degree, process_group)  # stored directed pairs from each node
    mean = all_reduce_sum(sums, process_group) / degree.unsqueeze(1)
    from_source = (fusion_weights - gather_rows(mean, source)).square().sum(dim=-1)
    from_target = (fusion_weights - gather_rows(mean, target)).square().sum(dim=-1)
    from_source = torch.where(source < num_anchors, from_source, 0.0)
    from_target = torch.where(mirrored & (target < num_anchors), from_target, 0.0)
    total = all_reduce_sum((from_source + from_target).sum(), process_group)
    num_pairs = int(degree[:num_anchors].sum())
    return scale * (1.0 - (total / num_pairs).clamp_min(eps).sqrt())
