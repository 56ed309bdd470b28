"""Mini-batch → dense correlation graph (SPEC.md §1).

Every sample of a batch becomes a node; every ordered pair of samples (self-loops included) becomes an
edge that carries the per-channel correlation of the two embeddings. The complete graph is symmetric
(``e_ij = e_ji``), so it can also be stored *undirected*: one row per unordered pair ``{i, j}``,
``i <= j``, which halves the edge work of :class:`~gca_pyg.nn.CorrelationNet` exactly.
"""
from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Data

from gca_pyg.utils import gather_rows

__all__ = [
    "build_batch_graph",
    "complete_edge_index",
    "pair_index",
    "to_dense_edges",
]


def complete_edge_index(num_nodes: int, *, undirected: bool = False,
                        device: Optional[torch.device] = None) -> Tensor:
    r"""Edge indices of the complete graph with self-loops.

    Args:
        num_nodes (int): Number of nodes :math:`N`.
        undirected (bool, optional): If :obj:`False`, all :math:`N^2` ordered pairs in row-major order
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


def to_dense_edges(edge_values: Tensor, edge_index: Tensor, num_nodes: int, *,
                   undirected: bool = False) -> Tensor:
    r"""Scatters per-edge values of a complete graph into a dense :math:`(N, N, \ast)` tensor.

    ``out[i, j]`` is the value of edge :math:`i \to j` (for :obj:`undirected` storage, of the pair
    :math:`\{i, j\}`, so ``out`` is symmetric in its first two dimensions). Differentiable.

    Raises:
        ValueError: If some ordered pair has no edge.
    """
    table = pair_index(edge_index, num_nodes, undirected=undirected)
    if bool((table < 0).any()):
        raise ValueError(
            f"to_dense_edges needs a complete graph on {num_nodes} nodes, but some node pairs have no "
            "edge; build it with build_batch_graph or complete_edge_index.")
    return gather_rows(edge_values, table)


def build_batch_graph(z: Tensor, y: Tensor, *, undirected: bool = False,
                      eps: float = 1e-12) -> Data:
    r"""Builds the dense correlation graph of a mini-batch (SPEC.md §1).

    Each embedding is centred by its own channel mean, :math:`\mathbf{x}_i = \mathbf{z}_i -
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
            :func:`complete_edge_index`) instead of all :math:`N^2` ordered pairs. Pass the same flag to
            :class:`~gca_pyg.nn.CorrelationNet`. (default: :obj:`False`)
        eps (float, optional): Lower bound of the norms, so that a constant embedding gives zero
            correlations instead of NaN. (default: :obj:`1e-12`)

    Returns:
        :class:`torch_geometric.data.Data` with ``x`` :math:`(N, D)` the centred features,
        ``edge_index`` :math:`(2, |\mathcal{E}|)`, ``edge_attr`` :math:`(|\mathcal{E}|, D)`,
        ``neg_mask`` :math:`(|\mathcal{E}|,)` bool, True where the two labels differ, and ``y``.
        Differentiable with respect to :obj:`z`.
    """
    if z.dim() != 2:
        raise ValueError(f"build_batch_graph expects embeddings of shape [N, D], got {tuple(z.shape)}")
    if y.dim() != 1 or y.numel() != z.size(0):
        raise ValueError(
            f"build_batch_graph expects one label per embedding: z has {z.size(0)} rows, "
            f"y has shape {tuple(y.shape)}")
    num_nodes = z.size(0)
    x = z - z.mean(dim=1, keepdim=True)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    edge_index = complete_edge_index(num_nodes, undirected=undirected, device=z.device)
    source, target = edge_index
    edge_attr = gather_rows(unit, source) * gather_rows(unit, target)
    neg_mask = y[source] != y[target]
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, neg_mask=neg_mask, y=y,
                num_nodes=num_nodes)
