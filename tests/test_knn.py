"""The sparse batch graph of graph.neighbors: k-NN pairs, their groups, masked synthesis and losses,
and the training step on it (equal to the dense step on the complete graph)."""

import math

import by_hand
import pytest
import torch
import torch.nn.functional as F

from gca_pyg.config import load_config
from gca_pyg.errors import ConfigError, NonFiniteLossError
from gca_pyg.graph import (
    BatchGraph,
    EdgeShard,
    GraphConfig,
    build_batch_graph,
    knn_pairs,
    shard_pairs,
    sparse_shard,
    to_dense_edges,
)
from gca_pyg.layout import class_layout
from gca_pyg.losses import diversity_loss, similarity_loss, synthetic_npair_loss
from gca_pyg.model import GCAHNG
from gca_pyg.schema import NetConfig, OptimConfig
from gca_pyg.synthesis import SyntheticSamples, synthesize_groups, synthesize_negatives
from gca_pyg.trainer import AlternatingTrainer

from tiny_model import TinyBackbone, batch


def shuffled_batch(num_classes, per_class, dim=8, seed=0):
    """Embeddings and labels of a class-balanced batch in random order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    return torch.randn(labels.numel(), dim, generator=generator, dtype=torch.float64), labels


def adjacency(edge_index, num_nodes):
    """Dense bool adjacency of undirected pairs; asserts that each pair is stored once."""
    source, target = edge_index
    codes = torch.minimum(source, target) * num_nodes + torch.maximum(source, target)
    assert codes.unique().numel() == codes.numel(), "a pair is stored twice"
    table = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    table[source, target] = True
    table[target, source] = True
    return table


def test_k_of_at_least_n_minus_1_gives_the_dense_pairs_and_groups():
    z, y = shuffled_batch(5, 3)
    layout = class_layout(y)
    dense = shard_pairs(layout)
    for k in (14, 100):
        pairs = knn_pairs(z, y, k)
        assert torch.equal(pairs, dense.edge_index)  # same pairs, same order
        shard = sparse_shard(layout, pairs)
        for name in ("anchor", "target_class", "edges"):
            assert torch.equal(getattr(shard, name), getattr(dense, name)), name
        assert shard.mask.shape == (75, 3) and bool(shard.mask.all())
    graph = build_batch_graph(z, y, undirected=True, neighbors=14)
    complete = build_batch_graph(z, y, undirected=True)
    assert torch.equal(
        to_dense_edges(graph.edge_attr, graph.edge_index, 15, undirected=True),
        to_dense_edges(complete.edge_attr, complete.edge_index, 15, undirected=True),
    )


def test_small_k_joins_the_nearest_samples_and_every_classmate():
    z, y = shuffled_batch(6, 4, dim=5, seed=1)
    num_nodes, k = 24, 3
    pairs = knn_pairs(z, y, k)
    table = adjacency(pairs, num_nodes)
    unit = F.normalize(z, dim=1)
    cosine = (unit @ unit.T).fill_diagonal_(-math.inf)
    nearest = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    nearest.scatter_(1, cosine.topk(k, dim=1).indices, True)
    classmates = y.unsqueeze(0) == y.unsqueeze(1)  # the diagonal too: self-loops
    assert torch.equal(table, nearest | nearest.T | classmates)
    assert bool(((table.sum(1) - 1) >= k).all())  # at least k neighbours besides itself
    assert pairs.size(1) < num_nodes * (num_nodes + 1) // 2
    # Directed storage holds both directions of every pair, a self-loop once.
    directed = build_batch_graph(z.float(), y, neighbors=k)
    assert directed.edge_index.size(1) == 2 * pairs.size(1) - num_nodes
    assert torch.equal(adjacency_directed(directed.edge_index, num_nodes), table)


def adjacency_directed(edge_index, num_nodes):
    table = torch.zeros(num_nodes, num_nodes, dtype=torch.long)
    table.index_put_(
        tuple(edge_index), torch.ones(edge_index.size(1), dtype=torch.long), accumulate=True
    )
    assert bool((table <= 1).all())
    return table.bool()


def test_groups_of_a_sparse_graph_are_the_classes_each_anchor_is_joined_to():
    z, y = shuffled_batch(6, 3, seed=2)
    layout = class_layout(y)
    pairs = knn_pairs(z, y, 2)
    shard = sparse_shard(layout, pairs)
    table = adjacency(pairs, 18)
    members = layout.members[shard.target_class]  # (G, K)
    joined = table[shard.anchor.unsqueeze(1), members]
    assert torch.equal(shard.mask, joined)
    ends = pairs[:, shard.edges]  # (2, G, K)
    anchor = shard.anchor.unsqueeze(1)
    hits = ((ends[0] == anchor) & (ends[1] == members)) | (
        (ends[1] == anchor) & (ends[0] == members)
    )
    assert bool(hits[shard.mask].all())
    # One group per (anchor, class) joined by at least one pair; own classes always complete.
    expected = torch.zeros(18, 6, dtype=torch.bool)
    expected.index_put_(
        (torch.arange(18).repeat_interleave(18), layout.class_index.repeat(18)),
        table.reshape(-1),
        accumulate=True,
    )
    assert torch.equal(BatchGraph(y, layout, shard).connected, expected)
    assert shard.num_groups == int(expected.sum()) < 18 * 6
    own = shard.target_class == layout.class_index[shard.anchor]
    assert int(own.sum()) == 18 and bool(shard.mask[own].all())
    assert int(shard.mask.sum()) == 2 * pairs.size(1) - 18  # every stored direction once


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_split_a_sparse_graph_into_whole_blocks_and_groups(world_size):
    z, y = shuffled_batch(7, 3, seed=3)
    layout = class_layout(y)
    pairs = knn_pairs(z, y, 4)
    whole = sparse_shard(layout, pairs)
    shards = [sparse_shard(layout, pairs, rank, world_size) for rank in range(world_size)]
    # Every pair on exactly one process, in order; sizes about equal.
    assert torch.equal(torch.cat([s.edge_index for s in shards], dim=1), pairs)
    sizes = [s.num_edges for s in shards]
    assert max(sizes) - min(sizes) <= 0.5 * pairs.size(1) / world_size
    # Every group whole on one process: the same members joined, through the same pairs.
    groups = {}
    for shard in shards:
        for g in range(shard.num_groups):
            key = (int(shard.anchor[g]), int(shard.target_class[g]))
            assert key not in groups, "a group on two processes"
            members = shard.edge_index[:, shard.edges[g][shard.mask[g]]]
            groups[key] = (shard.mask[g], members)
    assert len(groups) == whole.num_groups
    for g in range(whole.num_groups):
        mask, members = groups[(int(whole.anchor[g]), int(whole.target_class[g]))]
        assert torch.equal(mask, whole.mask[g])
        assert torch.equal(members, whole.edge_index[:, whole.edges[g][whole.mask[g]]])


def test_synthesis_merges_only_the_joined_members_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    layout = class_layout(y)
    z = torch.randn(6, 4, dtype=torch.float64)
    anchor = torch.tensor([1, 1, 1, 1])  # rank 1 of class 0: its positive is node 2
    target_class = torch.tensor([1, 1, 1, 1])
    weights = torch.rand(4, 3, 4, dtype=torch.float64)
    mix = torch.rand(3, 2, dtype=torch.float64)
    mask = torch.tensor(
        [[True, True, True], [False, True, True], [True, False, True], [False, False, True]]
    )
    out = synthesize_groups(z, layout, anchor, target_class, weights[mask], 0.7, mix, mask)
    u = mix[1]  # the coefficients of anchor block r(1) = 1
    moved = [synthesize_negatives(z[1], z[2], z[3 + k], weights[:, k], 0.7) for k in range(3)]
    expected = torch.stack(
        [
            moved[2][0] + u[1] * (moved[1][0] + u[0] * (moved[0][0] - moved[1][0]) - moved[2][0]),
            moved[2][1] + u[1] * (moved[1][1] - moved[2][1]),  # sample 0 missing: 1 starts
            moved[2][2] + u[1] * (moved[0][2] - moved[2][2]),  # sample 1 missing: skipped
            moved[2][3],  # only sample 2 joined
        ]
    )
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    full = synthesize_groups(z, layout, anchor, target_class, weights, 0.7, mix)
    every = torch.ones(4, 3, dtype=torch.bool)
    assert torch.equal(
        synthesize_groups(z, layout, anchor, target_class, weights.view(12, 4), 0.7, mix, every),
        full,
    )


def log_softmax_at(logits, index):
    top = max(logits)
    return logits[index] - top - math.log(sum(math.exp(v - top) for v in logits))


def test_masked_synthetic_npair_loss_by_hand():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    connected = torch.ones(6, 3, dtype=torch.bool)
    connected[0, 2] = connected[3, 0] = connected[5, 1] = connected[5, 0] = False
    connected[5, 2] = True  # own class: always a candidate (the positive)
    other = connected & (y.unsqueeze(1) != torch.arange(3))
    anchor_index, classes = other.nonzero(as_tuple=True)
    groups = connected.nonzero(as_tuple=True)  # a sparse graph's groups, own classes included
    shard = EdgeShard(
        edge_index=torch.zeros(2, 0, dtype=torch.long),
        anchor=groups[0],
        target_class=groups[1],
        edges=torch.zeros(len(groups[0]), 2, dtype=torch.long),
        mask=torch.ones(len(groups[0]), 2, dtype=torch.bool),
    )
    graph = BatchGraph(y, class_layout(y), shard)
    synthetic = SyntheticSamples(
        torch.randn(anchor_index.numel(), 4, dtype=torch.float64), anchor_index, classes
    )
    loss = synthetic_npair_loss(z, synthetic, graph)
    total, candidate_norms = 0.0, []
    for i in range(6):
        candidates = [z[i ^ 1]] + [
            synthetic.embeddings[r] for r in range(len(anchor_index)) if anchor_index[r] == i
        ]
        total -= log_softmax_at([float(z[i] @ c) for c in candidates], 0)
        candidate_norms += [float(c.square().sum()) for c in candidates]
    assert len(candidate_norms) == 6 + 8  # 6 positives, 12 - 4 synthetic negatives
    l2 = z.square().sum(1).mean().item() + sum(candidate_norms) / len(candidate_norms)
    assert loss.item() == pytest.approx(total / 6 + 0.25 * 3e-3 * l2, rel=1e-12)
    # Every joined (anchor, other class) needs its row, and only those may come.
    missing = SyntheticSamples(synthetic.embeddings[1:], anchor_index[1:], classes[1:])
    with pytest.raises(ValueError, match="exactly one synthetic negative.*sparse graph joins"):
        synthetic_npair_loss(z, missing, graph)
    with pytest.raises(ValueError, match="exactly one synthetic negative"):
        synthetic_npair_loss(z, synthetic, BatchGraph.build(y))


def test_sparse_similarity_and_diversity_losses_by_hand():
    # Nodes 0..3 of classes 0, 0, 1, 1; pairs {0,0} {1,1} {2,2} {3,3} {0,1} {0,2} {1,3}:
    # degrees 3, 3, 2, 2, and 6 groups: the 4 own-class ones, (0, class 1) and (1, class 1).
    y = torch.tensor([0, 0, 1, 1])
    pairs = torch.tensor([[0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 1, 2, 3]])
    graph = BatchGraph(y, class_layout(y), sparse_shard(class_layout(y), pairs))
    assert graph.total_groups == 8  # (2, class 0) and (3, class 0) too, by symmetry
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    synthetic = SyntheticSamples(
        torch.tensor([[1.0, 1.0], [3.0, 0.0], [9.0, 9.0]], dtype=torch.float64),
        torch.tensor([0, 1, 2]),
        torch.tensor([1, 1, 1]),  # the last is node 2's own class: it counts 0
    )
    j_sim = similarity_loss(z, synthetic, graph)
    assert j_sim.item() == pytest.approx((1 - 1 / math.sqrt(2) + 1) / 8)

    weights = torch.rand(7, 3, dtype=torch.float64)
    neighbours = {i: [] for i in range(4)}
    for row, (i, j) in enumerate(pairs.T.tolist()):
        neighbours[i].append(weights[row])
        if i != j:
            neighbours[j].append(weights[row])
    total = sum(
        float((w - torch.stack(ws).mean(0)).square().sum())
        for ws in neighbours.values()
        for w in ws
    )
    expected = 0.01 * (1 - math.sqrt(total / 10))  # 10 stored directed pairs
    assert diversity_loss(weights, graph).item() == pytest.approx(expected, rel=1e-12)


def make_trainer(neighbors, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    model = GCAHNG(
        TinyBackbone(),
        num_classes=6,
        embedding_size=16,
        net=NetConfig(num_layers=2, heads=4, dropout=0.1),
        graph=GraphConfig(neighbors=neighbors),
    ).to(device, dtype)
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=10))
    model.generator.mean_metric_loss = 3.0  # h < 1
    model.generator.mean_generator_loss = 1.0  # J_syn weighs in
    return trainer


def test_a_step_on_the_sparse_graph_with_k_of_n_minus_1_equals_the_dense_step(
    device, deterministic
):
    images, labels = batch()
    images, labels = images.double().to(device), labels.to(device)
    dense, sparse = make_trainer(None, device=device), make_trainer(11, device=device)
    embeddings = dense.model(images)
    dense_graph = dense.batch_graph(labels)
    sparse_graph = sparse.batch_graph(labels, embeddings)
    assert torch.equal(sparse_graph.shard.edge_index, dense_graph.shard.edge_index)
    assert sparse_graph.is_sparse and not dense_graph.is_sparse
    fusion = torch.rand(dense_graph.shard.num_edges, 16, dtype=torch.float64, device=device)
    mix = torch.rand(3, 2, dtype=torch.float64, device=device)
    for own_class in (False, True):
        expected = dense.model.generator.synthesize(
            embeddings, dense_graph, fusion, mix, own_class=own_class
        )
        actual = sparse.model.generator.synthesize(
            embeddings, sparse_graph, fusion, mix, own_class=own_class
        )
        for field in ("embeddings", "anchor", "class_index"):
            assert torch.equal(getattr(actual, field), getattr(expected, field)), field

    torch.manual_seed(5)
    expected = dense.training_step(images, labels)
    torch.manual_seed(5)
    actual = sparse.training_step(images, labels)
    assert actual == expected  # every loss, bit for bit (dropout included)
    # The gradients sum the same terms in another order: equal to rounding, which Adam's first
    # step (about lr = 1.5e-4 per parameter, whatever the gradient's size) can lift to ~1e-12.
    for (name, p), q in zip(dense.model.named_parameters(), sparse.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10), name


def test_the_model_synthesises_and_scores_a_sparse_graph_group_by_group():
    trainer = make_trainer(2)
    model = trainer.model
    images, labels = batch()
    model.train()
    embeddings = model(images.double()).detach()
    graph = trainer.batch_graph(labels, embeddings)
    mix, hardness = torch.rand(3, 2, dtype=torch.float64), 0.6
    model.generator.mean_metric_loss = 5.0 / math.log(1 / hardness)
    torch.manual_seed(3)
    with torch.no_grad():
        _, fusion = model.generator.correlate(embeddings, graph)
    torch.manual_seed(3)
    losses = model.generator_loss(embeddings, graph, mix)

    synthetic = by_hand.synthetic_samples(graph, embeddings, fusion, mix, hardness)
    j_ce, j_sim, j_div = by_hand.generator_losses(
        graph, embeddings, synthetic, fusion, model.generator.classifier
    )
    assert losses["J_ce"].item() == pytest.approx(j_ce, rel=1e-10)
    assert losses["J_sim"].item() == pytest.approx(j_sim, rel=1e-10)
    assert losses["J_div"].item() == pytest.approx(j_div, rel=1e-10)
    torch.manual_seed(3)  # the same dropout, so the same fusion weights
    metric = model.metric_loss(embeddings, graph, mix)
    expected = by_hand.synthetic_npair_loss(graph, embeddings, synthetic)
    assert metric["J_syn"].item() == pytest.approx(expected, rel=1e-10)


def test_training_on_a_sparse_graph_stays_finite_and_lowers_the_metric_loss(device):
    trainer = make_trainer(2, dtype=torch.float32, device=device)
    images, labels = batch()
    images, labels = images.to(device), labels.to(device)
    embeddings = trainer.model(images)
    shard = trainer.batch_graph(labels, embeddings).shard
    assert shard.num_edges < 12 * 13 // 2 and not bool(shard.mask.all())
    logs = [trainer.training_step(images, labels) for _ in range(12)]
    assert all(math.isfinite(value) for log in logs for value in log.values())
    assert logs[-1]["J_m"] < 0.75 * logs[0]["J_m"]


def test_nan_embeddings_stop_the_sparse_step_before_any_update():
    trainer = make_trainer(2, dtype=torch.float32)
    images, labels = batch()
    images[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="J_metric became nan"):
        trainer.training_step(images, labels)


def test_bad_neighbours_are_clear_errors():
    with pytest.raises(ConfigError, match=r"'graph.neighbors' .* positive int .* got 0"):
        load_config("demo", ["graph.neighbors=0"])
    assert load_config("demo", ["graph.neighbors=null"]).graph.neighbors is None
    assert load_config("demo", ["graph.neighbors=32"]).graph.neighbors == 32
    with pytest.raises(ValueError, match="positive int number of neighbours"):
        knn_pairs(torch.randn(4, 3), torch.arange(4), 0)
    with pytest.raises(ValueError, match="not both"):
        build_batch_graph(
            torch.randn(4, 3),
            torch.arange(4),
            neighbors=2,
            edge_index=torch.zeros(2, 1, dtype=torch.long),
        )
    trainer = make_trainer(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs the batch's embeddings"):
        trainer.batch_graph(torch.arange(4).repeat_interleave(3))
    pairs = knn_pairs(torch.randn(6, 3), torch.arange(3).repeat(2), 2)
    with pytest.raises(ValueError, match="block order of knn_pairs"):
        sparse_shard(class_layout(torch.arange(3).repeat(2)), pairs.flip(1), 0, 2)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        sparse_shard(class_layout(torch.arange(3).repeat(2)), pairs, 2, 2)
