"""GCA-HNG's synthesis and losses on a sparse batch graph (memory nodes included), group by group
and node by node with Python loops: the formulas of docs/method.md, written apart from the
library's vectorised code, for the tests to compare it against."""

import math

import torch
import torch.nn.functional as F

from gca_pyg.synthesis import synthesize_negatives


def log_softmax_at(logits, index):
    top = max(logits)
    return logits[index] - top - math.log(sum(math.exp(v - top) for v in logits))


def synthetic_samples(graph, nodes, fusion, mix, hardness):
    """Every group's synthetic sample from its joined members in slot order; a memory member
    (node N or later) first put at its anchor's norm. `nodes`: every node's features."""
    layout, shard, num_nodes = graph.layout, graph.shard, graph.num_nodes
    positive = layout.positive_index()
    samples = []
    for g in range(shard.num_groups):
        i, c = int(shard.anchor[g]), int(shard.target_class[g])
        result = None
        for k in range(layout.samples_per_class):
            if not shard.mask[g, k]:
                continue
            member = int(layout.members[c, k] if shard.members is None else shard.members[g, k])
            negative = nodes[member]
            if member >= num_nodes:  # a memory entry's direction at the anchor's norm
                negative = negative / negative.norm() * nodes[i].norm()
            n = synthesize_negatives(
                nodes[i], nodes[positive[i]], negative, fusion[shard.edges[g, k]], hardness
            )
            u = mix[layout.position[i], k - 1]
            result = n if result is None else n + u * (result - n)
        samples.append(result)
    return samples


def is_other(graph, g):
    shard = graph.shard
    return bool(shard.target_class[g] != graph.layout.class_index[shard.anchor[g]])


def generator_losses(graph, embeddings, synthetic, fusion, classifier):
    """J_ce, J_sim and J_div: J_ce and J_sim over the groups present, J_div over the batch
    anchors' stored neighbours (memory nodes have no row)."""
    shard, groups = graph.shard, graph.shard.num_groups
    ce = sim = 0.0
    for g, sample in enumerate(synthetic):
        i, c = int(shard.anchor[g]), int(shard.target_class[g])
        logits = F.linear(sample, classifier.weight.detach(), classifier.bias.detach())
        ce -= float(F.log_softmax(logits, dim=0)[graph.classes[c]])
        if is_other(graph, g):
            sim += 1 - float(F.cosine_similarity(embeddings[i], sample, dim=0))
    neighbours = {i: [] for i in range(graph.num_nodes)}
    for row, (i, j) in enumerate(shard.edge_index.T.tolist()):
        for anchor in {i, j}:  # a pair stands for both directions, a self-loop once
            if anchor < graph.num_nodes:
                neighbours[anchor].append(fusion[row])
    spread = sum(
        float((w - torch.stack(ws).mean(0)).square().sum())
        for ws in neighbours.values()
        for w in ws
    )
    directed_pairs = sum(len(ws) for ws in neighbours.values())
    j_div = 0.01 * (1 - math.sqrt(spread / directed_pairs))
    return 20 * ce / groups, sim / groups, j_div


def synthetic_npair_loss(graph, embeddings, synthetic, l2_reg=3e-3):
    """J_syn of N-pair: each anchor's softmax over its positive and its other-class groups."""
    shard, positive = graph.shard, graph.layout.positive_index()
    total, norms = 0.0, []
    for i in range(graph.num_nodes):
        candidates = [embeddings[positive[i]]] + [
            synthetic[g]
            for g in range(shard.num_groups)
            if is_other(graph, g) and shard.anchor[g] == i
        ]
        total -= log_softmax_at([float(embeddings[i] @ c) for c in candidates], 0)
        norms += [float(c.square().sum()) for c in candidates]
    l2 = embeddings.square().sum(1).mean().item() + sum(norms) / len(norms)
    return total / graph.num_nodes + 0.25 * l2_reg * l2
