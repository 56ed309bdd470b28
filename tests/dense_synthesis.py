"""Synthesis from dense fusion weights ``fusion[i, j]`` for every (anchor, class): the by-hand
tests' way to address the weights of a pair without building a graph."""

import torch

from gca_pyg.layout import class_layout
from gca_pyg.synthesis import SyntheticSamples, draw_mix, synthesize_groups


def synthesize_dense(z, y, fusion, hardness, mix=None, include_own_class=False):
    """One synthetic sample per (anchor, other class) — per (anchor, class) with
    `include_own_class` — grouped by anchor, then class; `fusion` is (N, N, D)."""
    layout = class_layout(y)
    if mix is None:
        mix = draw_mix(layout.samples_per_class)
    num_nodes, num_classes = y.numel(), layout.num_classes
    anchor = torch.arange(num_nodes).repeat_interleave(num_classes)
    target_class = torch.arange(num_classes).repeat(num_nodes)
    if not include_own_class:
        keep = target_class != layout.class_index[anchor]
        anchor, target_class = anchor[keep], target_class[keep]
    weights = fusion[anchor.unsqueeze(1), layout.members[target_class]]
    synthetic = synthesize_groups(z, layout, anchor, target_class, weights, hardness, mix)
    return SyntheticSamples(embeddings=synthetic, anchor=anchor, class_index=target_class)
