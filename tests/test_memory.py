"""Memory nodes (graph.memory): the queue, the batch graph with memory nodes, synthesis and losses
on it, the trainer that fills and reads the memory, and graph.memory: 0 as before, bit for bit."""

import importlib.util
import math
import signal
from pathlib import Path

import by_hand
import pytest
import torch
import torch.nn.functional as F
from test_train import folder_args, only_run_dir

import gca_pyg.trainer
from gca_pyg.app import train as train_cli
from gca_pyg.checkpoint import load_checkpoint
from gca_pyg.config import load_config
from gca_pyg.errors import ConfigError
from gca_pyg.graph import BatchGraph, GraphConfig, knn_memory_pairs, knn_pairs, sparse_shard
from gca_pyg.memory import EmbeddingMemory
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LossConfig, NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer

from tiny_model import TinyBackbone, batch

DATA = Path(__file__).parent / "data"


def _load_steps_script():
    spec = importlib.util.spec_from_file_location(
        "make_sparse_steps", DATA / "make_sparse_steps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


steps = _load_steps_script()


# -- the queue ---------------------------------------------------------------------------------
def rows(first, count, dim=2):
    return torch.arange(first, first + count).float().unsqueeze(1).repeat(1, dim)


def test_the_memory_keeps_the_last_m_embeddings_first_in_first_out():
    memory = EmbeddingMemory(5, 2)
    assert len(memory) == 0 and memory.contents()[0].shape == (0, 2)
    memory.enqueue(rows(0, 3), torch.arange(3))
    assert torch.equal(memory.contents()[1], torch.arange(3))
    memory.enqueue(rows(3, 4), torch.arange(3, 7))  # wraps around: 0 and 1 are replaced
    embeddings, labels = memory.contents()
    assert len(memory) == 5 and torch.equal(labels, torch.tensor([5, 6, 2, 3, 4]))
    assert torch.equal(embeddings[:, 0], labels.float())
    memory.enqueue(rows(10, 7), torch.arange(10, 17))  # more than it holds: the last 5
    assert sorted(memory.contents()[1].tolist()) == [12, 13, 14, 15, 16]

    embeddings = rows(0, 2).requires_grad_()
    memory.enqueue(embeddings * 2, torch.arange(2))
    assert not memory.contents()[0].requires_grad


def test_the_memory_state_round_trips_and_a_wrong_size_is_refused():
    memory = EmbeddingMemory(4, 3)
    memory.enqueue(torch.randn(6, 3), torch.arange(6))
    restored = EmbeddingMemory(4, 3)
    restored.load_state_dict(memory.state_dict())
    for saved, loaded in zip(memory.contents(), restored.contents()):
        assert torch.equal(saved, loaded)
    memory.enqueue(torch.randn(1, 3), torch.tensor([9]))
    restored.enqueue(memory.contents()[0][2:3], torch.tensor([9]))
    assert torch.equal(memory.contents()[1], restored.contents()[1])  # same next row
    with pytest.raises(ValueError, match="saved memory holds 4 embeddings of size 3, this run's 8"):
        EmbeddingMemory(8, 3).load_state_dict(memory.state_dict())


def test_bad_memory_input_is_a_clear_error():
    with pytest.raises(ValueError, match="positive int size, got 0"):
        EmbeddingMemory(0, 3)
    memory = EmbeddingMemory(4, 3)
    with pytest.raises(ValueError, match=r"embeddings \[\*, 3\], got \(2, 4\)"):
        memory.enqueue(torch.randn(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="one label per embedding"):
        memory.enqueue(torch.randn(2, 3), torch.arange(3))


def test_memory_needs_the_sparse_graph_and_non_negative_settings():
    with pytest.raises(ConfigError, match=r"'graph.memory' .* needs 'graph.neighbors'"):
        load_config("demo", ["graph.memory=64"])
    with pytest.raises(ConfigError, match="cannot be negative"):
        load_config("demo", ["graph.neighbors=4", "graph.memory_start=-1"])
    config = load_config("demo", ["graph.neighbors=4", "graph.memory=64", "graph.memory_start=2"])
    assert (config.graph.memory, config.graph.memory_start) == (64, 2)
    with pytest.raises(ConfigError, match="'graph.memory_neighbors' .* got 8 with graph.memory 0"):
        load_config("demo", ["graph.neighbors=4", "graph.memory_neighbors=8"])
    with pytest.raises(ConfigError, match="'graph.memory_neighbors' .* got 0"):
        load_config("demo", ["graph.neighbors=4", "graph.memory=64", "graph.memory_neighbors=0"])
    with pytest.raises(ValueError, match="memory nodes on the sparse graph only"):
        BatchGraph.build(torch.arange(2).repeat(2), memory=(torch.randn(3, 4), torch.arange(3)))


# -- the graph ---------------------------------------------------------------------------------
def memory_batch(seed=0, dim=6, memory_classes=10):
    """A batch of classes 0-3 × 3 in random order, and a memory of 30 entries of classes
    0..memory_classes - 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat(3)[torch.randperm(12, generator=generator)]
    z = torch.randn(12, dim, generator=generator, dtype=torch.float64)
    memory_y = torch.randint(0, memory_classes, (30,), generator=generator)
    memory_z = torch.randn(30, dim, generator=generator, dtype=torch.float64)
    return z, labels, memory_z, memory_y


def reference_pairs(z, y, k, memory_z, memory_y, memory_k=None):
    """knn_memory_pairs by its definition, node by node: pairs as frozensets of ('b', i) batch and
    ('m', r) memory-row nodes, the memory rows chosen, and how many were over the cap of K."""
    batch_labels, per_class = set(y.tolist()), int((y == y[0]).sum())
    pool = [("b", j, z[j]) for j in range(len(y))]
    pool += [
        ("m", r, memory_z[r]) for r in range(len(memory_y)) if int(memory_y[r]) not in batch_labels
    ]
    pairs, chosen, capped = set(), set(), 0
    for i in range(len(y)):
        ranked = sorted(
            (item for item in pool if item[:2] != ("b", i)),
            key=lambda item: -float(F.cosine_similarity(z[i], item[2], dim=0)),
        )
        if memory_k is None:  # one search over both
            ranked = ranked[:k]
        else:  # k in the batch, memory_k in the memory
            in_batch = [item for item in ranked if item[0] == "b"]
            ranked = in_batch[:k] + [item for item in ranked if item[0] == "m"][:memory_k]
        per_memory_class = {}
        for kind, index, _ in ranked:
            if kind == "m":
                label = int(memory_y[index])
                per_memory_class[label] = per_memory_class.get(label, 0) + 1
                if per_memory_class[label] > per_class:
                    capped += 1
                    continue
                chosen.add(index)
            pairs.add(frozenset([("b", i), (kind, index)]))
        for j in range(len(y)):
            if y[j] == y[i]:
                pairs.add(frozenset([("b", i), ("b", j)]))
    pairs |= {frozenset([("m", r)]) for r in chosen}  # each memory node's self-loop
    return pairs, sorted(chosen), capped


@pytest.mark.parametrize("k, memory_classes", [(1, 10), (4, 10), (9, 6)])
def test_memory_pairs_are_each_batch_nodes_k_nearest_among_batch_and_other_class_memory(
    k, memory_classes
):
    z, y, memory_z, memory_y = memory_batch(memory_classes=memory_classes)
    pairs, memory_index = knn_memory_pairs(z, y, k, memory_z, memory_y)
    expected, chosen, capped = reference_pairs(z, y, k, memory_z, memory_y)
    separate = reference_pairs(z, y, k, memory_z, memory_y, memory_k=k + 1)
    pairs_apart, index_apart = knn_memory_pairs(z, y, k, memory_z, memory_y, k + 1)
    assert index_apart.tolist() == separate[1]

    def node_apart(n):
        return ("b", n) if n < 12 else ("m", int(index_apart[n - 12]))

    assert {frozenset([node_apart(a), node_apart(b)]) for a, b in pairs_apart.T.tolist()} == (
        separate[0]
    )
    batch_only = (pairs_apart < 12).all(
        dim=0
    )  # searched apart, the batch's pairs stay as they were
    assert torch.equal(pairs_apart[:, batch_only], knn_pairs(z, y, k))
    assert memory_index.tolist() == chosen  # memory nodes in memory order
    assert not bool(torch.isin(memory_y[memory_index], y).any())

    def node(n):
        return ("b", n) if n < 12 else ("m", int(memory_index[n - 12]))

    found = [frozenset([node(a), node(b)]) for a, b in pairs.T.tolist()]
    assert len(found) == len(set(found)) and set(found) == expected
    source, target = pairs
    # A batch node first in every pair but a memory node's self-loop; no memory-memory pairs.
    assert bool(((source < 12) | (source == target)).all())
    if k == 9:  # a memory class beside a node for at most K = 3 entries: the cap binds here
        assert capped > 0
        per_group = {}
        for a, b in pairs.T.tolist():
            if b >= 12 and a < 12:
                key = (a, int(memory_y[memory_index[b - 12]]))
                per_group[key] = per_group.get(key, 0) + 1
        assert max(per_group.values()) == 3


def test_memory_of_batch_classes_only_gives_the_batch_graph():
    z, y, _, _ = memory_batch()
    memory_z, memory_y = torch.randn(5, 6, dtype=torch.float64), y[:5]
    pairs, memory_index = knn_memory_pairs(z, y, 3, memory_z, memory_y)
    assert memory_index.numel() == 0 and torch.equal(pairs, knn_pairs(z, y, 3))
    graph = BatchGraph.build(y, z, neighbors=3, memory=(memory_z, memory_y))
    assert graph.memory is None and torch.equal(graph.shard.edge_index, pairs)


def memory_graph(k=4):
    z, y, memory_z, memory_y = memory_batch()
    return z, BatchGraph.build(y, z, neighbors=k, memory=(memory_z, memory_y))


def test_memory_classes_are_groups_of_their_joined_memory_nodes_and_never_anchors():
    z, graph = memory_graph()
    layout, shard, memory = graph.layout, graph.shard, graph.memory
    assert memory is not None and graph.num_classes == 4 + memory.num_classes
    assert torch.equal(graph.classes[4:], memory.classes)
    assert bool((shard.anchor < 12).all())
    joined = {}  # (anchor, class row) -> joined nodes, from the pairs
    for row, (a, b) in enumerate(shard.edge_index.T.tolist()):
        for anchor, other in {(a, b), (b, a)}:
            if anchor < 12:
                node_class = layout.class_index if other < 12 else None
                c = int(node_class[other]) if other < 12 else int(memory.class_index[other - 12])
                joined.setdefault((anchor, c), []).append((other, row))
    assert shard.num_groups == len(joined)
    for g in range(shard.num_groups):
        anchor, c = int(shard.anchor[g]), int(shard.target_class[g])
        members = sorted(joined[(anchor, c)])
        if c < 4:  # a batch class: its K samples by position, as without memory
            slots = [int(layout.position[n]) for n, _ in members]
            assert all(n == int(layout.members[c, s]) for (n, _), s in zip(members, slots))
        else:  # a memory class: its joined memory nodes in node order
            slots = list(range(len(members)))
            assert [int(shard.members[g, s]) for s in slots] == [n for n, _ in members]
        assert shard.mask[g].nonzero().view(-1).tolist() == sorted(slots)
        assert [int(shard.edges[g, s]) for s in slots] == [row for _, row in members]
    assert int(graph.connected[:, 4:].sum()) == sum(c >= 4 for _, c in joined)


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_split_a_graph_with_memory_into_whole_groups(world_size):
    z, graph = memory_graph()
    whole = graph.shard
    shards = [
        sparse_shard(graph.layout, whole.edge_index, rank, world_size, memory=graph.memory)
        for rank in range(world_size)
    ]
    assert sum(shard.num_edges for shard in shards) == whole.num_edges
    groups = {}
    for shard in shards:
        for g in range(shard.num_groups):
            nodes = shard.members[g][shard.mask[g]]
            rows = shard.edge_index[:, shard.edges[g][shard.mask[g]]]
            groups[(int(shard.anchor[g]), int(shard.target_class[g]))] = (nodes, rows)
    assert len(groups) == whole.num_groups
    for g in range(whole.num_groups):
        nodes, rows = groups[(int(whole.anchor[g]), int(whole.target_class[g]))]
        assert torch.equal(rows, whole.edge_index[:, whole.edges[g][whole.mask[g]]])
        assert torch.equal(nodes, whole.members[g][whole.mask[g]])


# -- synthesis and losses on a graph with memory nodes ----------------------------------------
def memory_model(metric="npair", synthetic_proxies="anchor", memory_neighbors=None):
    torch.manual_seed(0)
    return GCAHNG(
        TinyBackbone(),
        num_classes=10,
        embedding_size=16,
        net=NetConfig(num_layers=2, heads=4, dropout=0.1),
        loss=LossConfig(metric=metric, synthetic_proxies=synthetic_proxies),
        graph=GraphConfig(neighbors=4, memory=30, memory_neighbors=memory_neighbors),
    ).double()


@pytest.mark.parametrize("metric", ["npair", "proxy_others", "npair_memory_apart"])
def test_synthesis_and_every_loss_by_hand_on_a_graph_with_memory_nodes(metric):
    """Memory classes are groups like the batch's: merged from their joined memory nodes, scored
    by J_ce as their class, by J_sim and J_syn as negatives; J_div runs over the batch anchors."""
    model = memory_model(
        **{
            "npair": {},
            "proxy_others": {"metric": "proxy_anchor", "synthetic_proxies": "others"},
            "npair_memory_apart": {"memory_neighbors": 5},
        }[metric]
    )
    images, labels = batch()  # classes 0-3 × 3
    model.train()
    embeddings = model(images.double()).detach()
    generator = torch.Generator().manual_seed(4)
    memory_y = torch.randint(0, 10, (30,), generator=generator)
    memory_z = embeddings[torch.randint(0, 12, (30,), generator=generator)] + torch.randn(
        30, 16, generator=generator, dtype=torch.float64
    )
    graph = BatchGraph.build(
        labels,
        embeddings,
        neighbors=model.graph_config.neighbors,
        memory=(memory_z, memory_y),
        memory_neighbors=model.graph_config.memory_neighbors,
    )
    shard, memory = graph.shard, graph.memory
    pairs, _ = knn_memory_pairs(
        embeddings, labels, 4, memory_z, memory_y, model.graph_config.memory_neighbors
    )
    assert torch.equal(shard.edge_index, pairs)
    assert memory is not None and bool((shard.target_class >= 4).any())
    # Memory nodes at the batch's mean norm: a stored norm is stale, its direction is kept.
    scale = embeddings.norm(dim=1).mean()
    nodes = torch.cat([embeddings, F.normalize(memory.embeddings, dim=1) * scale])
    torch.testing.assert_close(graph.node_embeddings(embeddings), nodes, rtol=1e-12, atol=0)
    torch.testing.assert_close(graph.data(embeddings).x, nodes, rtol=1e-12, atol=0)
    mix, hardness = torch.rand(3, 2, dtype=torch.float64), 0.6
    model.generator.mean_metric_loss = 5.0 / math.log(1 / hardness)
    torch.manual_seed(3)
    with torch.no_grad():
        node_logits, fusion = model.generator.correlate(embeddings, graph)
    assert node_logits.shape == (12, 10)  # the batch's nodes only: memory nodes are no anchors
    torch.manual_seed(3)
    losses = model.generator_loss(embeddings, graph, mix)

    synthetic = by_hand.synthetic_samples(graph, nodes, fusion, mix, hardness)
    for g in range(shard.num_groups):  # memory classes merge memory nodes only
        members = shard.members[g][shard.mask[g]]
        assert bool((members >= 12).all() if shard.target_class[g] >= 4 else (members < 12).all())
    j_ce, j_sim, j_div = by_hand.generator_losses(
        graph, embeddings, synthetic, fusion, model.generator.classifier
    )
    assert losses["J_ce"].item() == pytest.approx(j_ce, rel=1e-10)
    assert losses["J_sim"].item() == pytest.approx(j_sim, rel=1e-10)
    assert losses["J_div"].item() == pytest.approx(j_div, rel=1e-10)

    torch.manual_seed(3)
    j_syn = model.metric_loss(embeddings, graph, mix)["J_syn"].item()
    other = [g for g in range(shard.num_groups) if by_hand.is_other(graph, g)]
    if metric.startswith("npair"):
        expected = by_hand.synthetic_npair_loss(graph, embeddings, synthetic)
        assert j_syn == pytest.approx(expected, rel=1e-10)
    else:  # each synthetic sample pushes every proxy but its class's, memory classes included
        proxies = model.criterion.proxies.detach()
        pushes = []
        for p in range(10):
            terms = [
                math.exp(32 * (float(F.cosine_similarity(synthetic[g], proxies[p], dim=0)) + 0.1))
                for g in other
                if int(graph.classes[shard.target_class[g]]) != p
            ]
            if terms:
                pushes.append(math.log(1 + sum(terms)))
        assert j_syn == pytest.approx(sum(pushes) / len(pushes), rel=1e-9)


# -- training with memory ----------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["npair", "proxy_anchor"])
def test_without_memory_training_is_bit_for_bit_what_it_was(metric, two_threads):
    """data/sparse_steps.pt holds what the code before memory nodes computed
    (data/make_sparse_steps.py); graph.memory 0, or a memory not started yet, gives the same."""
    expected, exact = recorded_steps(metric)
    for graph in (GraphConfig(neighbors=2), GraphConfig(neighbors=2, memory=16, memory_start=1)):
        actual = steps.run(metric, graph)
        losses = [losses_only(step) for step in actual["losses"]]
        if exact:
            assert losses == expected["losses"]
        else:  # no record for this CPU's kernels: the last bits may differ
            assert losses == [pytest.approx(step, rel=1e-10) for step in expected["losses"]]
        for name, value in expected["state"].items():
            if exact:
                assert torch.equal(actual["state"][name], value), name
            else:
                torch.testing.assert_close(actual["state"][name], value, rtol=1e-6, atol=1e-9)
    # A started memory, full of classes the later batches miss, changes every later step.
    active = [
        losses_only(step)
        for step in steps.run(metric, GraphConfig(neighbors=2, memory=16))["losses"]
    ]
    assert active[0] == (expected["losses"][0] if exact else pytest.approx(expected["losses"][0]))
    assert all(a["J_metric"] != b["J_metric"] for a, b in zip(active[1:], expected["losses"][1:]))


def recorded_steps(metric):
    """The record of data/make_sparse_steps.py for this CPU, and whether it was made with this
    CPU's kernels: ``sparse_steps.pt`` on an AVX2 CPU, ``sparse_steps.<capability>.pt`` (the same
    script at the same commit) where wider vector kernels sum in another order. Elsewhere the
    AVX2 record, compared to within rounding."""
    capability = torch.backends.cpu.get_cpu_capability()
    own = DATA / f"sparse_steps.{capability}.pt"
    path = own if own.exists() else DATA / "sparse_steps.pt"
    exact = own.exists() or capability == "AVX2"
    return torch.load(path, weights_only=False)[metric], exact


def losses_only(logs):
    """A step's logs without the count of memory nodes (a log, not a loss)."""
    return {name: value for name, value in logs.items() if name != "memory_nodes"}


def test_the_trainer_fills_the_memory_from_memory_start_with_each_steps_batch():
    model = GCAHNG(
        steps.Features(),
        steps.CLASSES,
        16,
        graph=GraphConfig(neighbors=2, memory=40, memory_start=1),
    ).double()
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
    batches = list(steps.batches())
    assert trainer.training_step(*batches[0])["memory_nodes"] == 0
    assert (
        len(trainer.memory) == 0
        and trainer.batch_graph(batches[1][1], model(batches[1][0])).memory is None
    )
    trainer.end_epoch()  # epoch 1: memory_start
    for images, labels in batches[1:]:
        model.train()
        with torch.no_grad():
            before = model(images)  # what the step embeds: its parameters before the update
        filled = len(trainer.memory)
        logs = trainer.training_step(images, labels)
        assert (logs["memory_nodes"] > 0) == (filled > 0)
        stored, stored_labels = trainer.memory.contents()
        assert len(trainer.memory) == filled + 12
        assert torch.equal(stored_labels[filled:], labels)
        torch.testing.assert_close(stored[filled:], before, rtol=0, atol=1e-12)
    graph = trainer.batch_graph(labels, before)
    assert graph.memory is not None
    assert not bool(torch.isin(graph.memory.labels, labels).any())
    assert bool(torch.isin(graph.memory.labels, stored_labels).all())
    state = trainer.state_dict()["memory"]
    assert torch.equal(state["labels"], stored_labels) and not stored.requires_grad


def test_an_interrupted_run_with_memory_resumes_exactly(image_folder, tmp_path, monkeypatch):
    """Ctrl-C in the first epoch, resume: the memory comes back from the checkpoint, and the run
    ends where the uninterrupted one does (4 train classes, 2 a batch: memory classes each step)."""
    extra = ["data.classes_per_batch=2", "graph.neighbors=2", "graph.memory=12", "optim.epochs=1"]
    straight = tmp_path / "straight"
    assert train_cli.main(folder_args(image_folder, straight, *extra)) == 0
    expected = load_checkpoint(only_run_dir(straight) / "last.pt")
    assert expected["training"]["memory"]["labels"].numel() == 12

    original_step = gca_pyg.trainer.AlternatingTrainer.training_step
    calls = []

    def interrupted_step(trainer, images, labels):
        logs = original_step(trainer, images, labels)
        calls.append(len(trainer.memory))
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return logs

    monkeypatch.setattr(gca_pyg.trainer.AlternatingTrainer, "training_step", interrupted_step)
    interrupted = tmp_path / "interrupted"
    assert train_cli.main(folder_args(image_folder, interrupted, *extra)) == train_cli.INTERRUPTED
    run_dir = only_run_dir(interrupted)
    saved = load_checkpoint(run_dir)
    assert calls == [4, 8, 12] and saved["training"]["memory"]["labels"].numel() == 12
    monkeypatch.undo()

    assert train_cli.main(["--resume", str(run_dir)]) == 0
    resumed = load_checkpoint(run_dir / "last.pt")
    for name, value in expected["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed["model"][name], value), name
    for name, value in expected["training"]["memory"].items():
        assert torch.equal(
            torch.as_tensor(resumed["training"]["memory"][name]), torch.as_tensor(value)
        )
