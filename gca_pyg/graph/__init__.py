"""The batch graph of GCA-HNG (docs/method.md, "The batch graph"): a mini-batch as a correlation
graph, complete or sparse, its pairs split between processes, and what one training step knows of
it. Its submodules, each importing only those above it in this list:

* :mod:`gca_pyg.graph.memory_nodes`: :class:`MemoryNodes`, the past embeddings (``graph.memory``)
  that joined a step's graph.
* :mod:`gca_pyg.graph.sharding`: the split of the undirected pairs between processes by class-pair
  block (:class:`EdgeShard`): :func:`shard_pairs` for the complete graph, :func:`sparse_shard` for
  the (anchor, class) groups of a sparse one.
* :mod:`gca_pyg.graph.neighbors`: the pairs of the sparse graph (``graph.neighbors``):
  :func:`knn_pairs` (faiss k-NN and classmates), :func:`knn_memory_pairs` (with memory nodes).
* :mod:`gca_pyg.graph.batch`: the PyG graph of a batch
  (:func:`build_batch_graph`, :func:`complete_edge_index`, :func:`pair_index`,
  :func:`to_dense_edges`); :class:`BatchGraph`, built once per step and read by the generator and
  the losses.

Every public name is re-exported here: ``from gca_pyg.graph import BatchGraph``; so is the
``graph`` section of the config, :class:`~gca_pyg.schema.GraphConfig`.
"""

from gca_pyg.graph.batch import (
    BatchGraph,
    build_batch_graph,
    complete_edge_index,
    pair_index,
    to_dense_edges,
)
from gca_pyg.graph.memory_nodes import MemoryNodes
from gca_pyg.graph.neighbors import knn_memory_pairs, knn_pairs
from gca_pyg.graph.sharding import EdgeShard, shard_pairs, sparse_shard
from gca_pyg.schema import GraphConfig

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
