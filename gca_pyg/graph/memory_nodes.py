"""Memory nodes: past embeddings that joined one step's batch graph.

Past embeddings can join the sparse graph as *memory nodes* (``graph.memory: M``, a
:class:`~gca_pyg.memory.EmbeddingMemory`): :func:`~gca_pyg.graph.neighbors.knn_memory_pairs`
searches each batch node's :math:`k` nearest among the batch and the memory entries of classes the
batch does not hold, and the memory entries found become extra nodes (:class:`MemoryNodes`), joined
to the batch nodes that found them. They are never anchors; their classes become groups of
synthesis.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MemoryNodes"]


@dataclass(frozen=True)
class MemoryNodes:
    r"""The memory entries that joined one step's batch graph, as nodes :math:`N \dots N + U - 1`
    after the batch's :math:`N` (:func:`knn_memory_pairs`).

    Attributes:
        embeddings: Their embeddings, detached, :math:`(U, D)`.
        labels: Their labels, :math:`(U,)`; none of them is a label of the batch.
        index: Their rows in the memory, ascending, :math:`(U,)`.
        classes: Their distinct labels, ascending, :math:`(C_m,)`: the *memory classes*, which
            follow the batch's :math:`C` classes as class rows :math:`C \dots C + C_m - 1`.
        class_index: The class row of each, :math:`C + ` its row in :attr:`classes`, :math:`(U,)`.
    """

    embeddings: Tensor
    labels: Tensor
    index: Tensor
    classes: Tensor
    class_index: Tensor

    @classmethod
    def select(
        cls, memory_embeddings: Tensor, memory_labels: Tensor, index: Tensor, num_batch_classes: int
    ) -> "MemoryNodes":
        """The memory rows `index` as nodes of a graph whose batch has `num_batch_classes`."""
        labels = memory_labels[index]
        classes, inverse = torch.unique(labels, return_inverse=True)
        return cls(
            embeddings=memory_embeddings[index].detach(),
            labels=labels,
            index=index,
            classes=classes,
            class_index=num_batch_classes + inverse,
        )

    @property
    def num_nodes(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return self.classes.numel()
