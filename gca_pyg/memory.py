"""A cross-batch memory of past training embeddings (``graph.memory``; docs/method.md, "Memory
nodes").

:class:`EmbeddingMemory` keeps the last :math:`M` embeddings of the training batches with their
labels, detached, as the queue of cross-batch memory (`Wang et al., "Cross-Batch Memory for
Embedding Learning" <https://arxiv.org/abs/1912.06798>`_, CVPR 2020). The trainer fills it with
every step's embeddings after the step's updates and hands its contents to the next step's batch
graph (:meth:`BatchGraph.build <gca_pyg.graph.BatchGraph.build>`), whose memory nodes they become.
"""

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["EmbeddingMemory"]


class EmbeddingMemory:
    r"""A first-in first-out queue of the last `size` embeddings and their labels.

    Under ``torchrun`` every process enqueues the embeddings of the whole batch (the model gathers
    them in its forward pass) in rank order, so every process holds the same memory.
    :meth:`state_dict` holds the whole queue, so a resumed run continues with the same memory.

    Args:
        size (int): :math:`M`, the number of embeddings kept.
        embedding_size (int): :math:`D`.
        device (torch.device, optional): Where the queue lives. (default: :obj:`None`, the CPU)
        dtype (torch.dtype, optional): Its embeddings' dtype. (default: :obj:`torch.float32`)
    """

    def __init__(
        self,
        size: int,
        embedding_size: int,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"EmbeddingMemory needs a positive int size, got {size!r}")
        self.size = size
        self.embeddings = torch.zeros(size, embedding_size, dtype=dtype, device=device)
        self.labels = torch.zeros(size, dtype=torch.long, device=device)
        self.filled = 0  # how many rows hold an embedding
        self.next = 0  # the row the next embedding goes to

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor):
        """Adds a batch (detached), replacing the oldest entries once the queue is full; of a
        batch larger than the queue only its last `size` rows are kept."""
        if embeddings.dim() != 2 or embeddings.size(1) != self.embeddings.size(1):
            raise ValueError(
                f"EmbeddingMemory holds embeddings [*, {self.embeddings.size(1)}], got "
                f"{tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"EmbeddingMemory needs one label per embedding: {embeddings.size(0)} embeddings, "
                f"labels of shape {tuple(labels.shape)}"
            )
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        count = labels.numel()
        rows = (self.next + torch.arange(count, device=self.labels.device)) % self.size
        self.embeddings[rows] = embeddings.detach().to(self.embeddings)
        self.labels[rows] = labels.to(self.labels.device)
        self.next = (self.next + count) % self.size
        self.filled = min(self.filled + count, self.size)

    def contents(self) -> tuple[Tensor, Tensor]:
        """The embeddings :math:`(F, D)` and labels :math:`(F,)` held, :math:`F` = ``len(self)``,
        in storage order (the same on every process)."""
        return self.embeddings[: self.filled], self.labels[: self.filled]

    def clear(self):
        self.filled = self.next = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "embeddings": self.embeddings[: self.filled].clone(),
            "labels": self.labels[: self.filled].clone(),
            "next": self.next,
        }

    def load_state_dict(self, state: dict[str, Any]):
        """Restores a queue of the same size.

        Raises:
            ValueError: If the saved queue's size or embedding size differs from this one's.
        """
        if state["size"] != self.size or state["embeddings"].size(1) != self.embeddings.size(1):
            raise ValueError(
                f"the saved memory holds {state['size']} embeddings of size "
                f"{state['embeddings'].size(1)}, this run's {self.size} of size "
                f"{self.embeddings.size(1)}: resume with the graph.memory and "
                "model.embedding_size the checkpoint was trained with"
            )
        self.clear()
        filled = state["labels"].numel()
        self.embeddings[:filled] = state["embeddings"].to(self.embeddings)
        self.labels[:filled] = state["labels"].to(self.labels.device)
        self.filled, self.next = filled, int(state["next"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, "
            f"embedding_size={self.embeddings.size(1)}, filled={self.filled})"
        )
