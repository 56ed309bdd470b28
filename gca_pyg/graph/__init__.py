"""The batch graph of GCA-HNG (docs/method.md, "The batch graph"), in :mod:`gca_pyg.graph.batch`;
every public name is re-exported here: ``from gca_pyg.graph import BatchGraph``."""

from gca_pyg.graph.batch import (
    BatchGraph,
    EdgeShard,
    GraphConfig,
    MemoryNodes,
    build_batch_graph,
    complete_edge_index,
    knn_memory_pairs,
    knn_pairs,
    pair_index,
    shard_pairs,
    sparse_shard,
    to_dense_edges,
)

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
