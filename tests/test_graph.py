import pytest
import torch

from gca_pyg.graph import (
    build_batch_graph,
    complete_edge_index,
    pair_index,
    shard_pairs,
    to_dense_edges,
)
from gca_pyg.layout import class_layout


def test_complete_edge_index_orders_pairs_row_major():
    assert complete_edge_index(3).tolist() == [
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 1, 2, 0, 1, 2, 0, 1, 2],
    ]
    assert complete_edge_index(3, undirected=True).tolist() == [
        [0, 0, 0, 1, 1, 2],
        [0, 1, 2, 1, 2, 2],
    ]


def test_batch_graph_shapes_and_masks(device):
    z = torch.randn(6, 8, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    data = build_batch_graph(z, y)
    assert data.x.shape == (6, 8)
    assert data.edge_index.shape == (2, 36)
    assert data.edge_attr.shape == (36, 8)
    assert data.neg_mask.dtype == torch.bool and data.neg_mask.shape == (36,)
    source, target = data.edge_index
    assert torch.equal(data.neg_mask, y[source] != y[target])
    assert data.num_nodes == 6
    assert torch.equal(data.x, z)  # nodes carry the embeddings; only the edges are centred


def test_channel_sum_is_pearson_correlation():
    z = torch.randn(7, 16, dtype=torch.float64) * 3 + 1
    data = build_batch_graph(z, torch.arange(7))
    pearson = torch.corrcoef(z)  # rows are variables
    channel_sum = data.edge_attr.sum(dim=1).view(7, 7)
    assert torch.allclose(channel_sum, pearson, atol=1e-12)
    # Per channel, e_ij = x_i * x_j / (|x_i| |x_j|) with x centred per sample.
    x = z - z.mean(dim=1, keepdim=True)
    unit = x / x.norm(dim=1, keepdim=True)
    assert torch.allclose(data.edge_attr.view(7, 7, 16)[2, 5], unit[2] * unit[5])


def test_undirected_storage_holds_the_same_pairs():
    z = torch.randn(5, 4)
    y = torch.tensor([0, 1, 0, 1, 2])
    directed = build_batch_graph(z, y)
    undirected = build_batch_graph(z, y, undirected=True)
    assert undirected.edge_index.size(1) == 15
    dense_directed = to_dense_edges(directed.edge_attr, directed.edge_index, 5)
    dense_undirected = to_dense_edges(
        undirected.edge_attr, undirected.edge_index, 5, undirected=True
    )
    assert torch.equal(dense_directed, dense_undirected)
    mask = to_dense_edges(undirected.neg_mask, undirected.edge_index, 5, undirected=True)
    assert torch.equal(mask, y[:, None] != y[None, :])


def test_graph_is_differentiable_and_safe_for_constant_rows():
    z = torch.randn(4, 6)
    z[1] = 2.5  # a constant embedding has zero norm once centred
    z.requires_grad_(True)
    data = build_batch_graph(z, torch.arange(4))
    assert torch.isfinite(data.edge_attr).all()
    data.edge_attr.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_pair_index_and_to_dense_reject_incomplete_graphs():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    table = pair_index(edge_index, 3)
    assert table[0, 1] == 0 and table[1, 2] == 1 and table[2, 0] == -1
    with pytest.raises(ValueError, match="complete graph"):
        to_dense_edges(torch.randn(2, 3), edge_index, 3)


@pytest.mark.parametrize(
    "z, y, match",
    [
        (torch.randn(4), torch.arange(4), r"\[N, D\]"),
        (torch.randn(4, 3), torch.arange(5), "one label per embedding"),
    ],
)
def test_batch_graph_rejects_bad_shapes(z, y, match):
    with pytest.raises(ValueError, match=match):
        build_batch_graph(z, y)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_pair_once_and_hold_whole_groups(world_size):
    classes, samples = 5, 3
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 3, 4, 9, 5, 5, 1, 4, 3, 9])
    layout = class_layout(labels)
    nodes = labels.numel()
    covered = torch.zeros(nodes, nodes, dtype=torch.long)
    groups, counts = set(), []
    for rank in range(world_size):
        shard = shard_pairs(layout, rank, world_size)
        source, target = shard.edge_index
        covered[source, target] += 1
        covered[target, source] += (source != target).long()
        counts.append(shard.num_edges)
        members = layout.members[shard.target_class]  # (G, K)
        ends = shard.edge_index[:, shard.edges]  # (2, G, K)
        anchor = shard.anchor.unsqueeze(1)
        assert bool(
            (
                ((ends[0] == anchor) & (ends[1] == members))
                | ((ends[1] == anchor) & (ends[0] == members))
            ).all()
        )
        groups.update(zip(shard.anchor.tolist(), shard.target_class.tolist()))
    assert bool((covered == 1).all())  # every ordered pair, self-loops included, exactly once
    assert len(groups) == nodes * classes  # every (anchor, class) group on exactly one process
    assert sum(counts) == nodes * (nodes + 1) // 2
    assert max(counts) - min(counts) <= samples * samples  # balanced to within one block
