"""The class structure of a class-balanced batch, derived from its labels.

GCA-HNG pairs every sample with a positive of its own class and mixes the samples of each class in
a fixed order (docs/method.md, "Roles within a class"). The reference code reads both off positions
in a batch laid out sample-major; here the classes come from the labels and the roles within a class
from the batch order of its samples (the sampler draws them at random). A permutation of the batch
that keeps each class's internal order therefore permutes every derived quantity without
changing it.

The layout is derived once per training step and passed to the graph, the synthesis and the losses.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassLayout:
    """Where each class's samples are in a class-balanced batch of C classes × K samples.

    Attributes:
        classes: The C distinct labels, ascending, shape (C,).
        members: Batch indices of each class's samples in batch order, shape (C, K).
        class_index: For every sample, the row of its class in :attr:`classes`, shape (N,).
        position: For every sample, its position k within its class, shape (N,).
    """

    classes: Tensor
    members: Tensor
    class_index: Tensor
    position: Tensor

    @property
    def num_classes(self) -> int:
        return self.members.size(0)

    @property
    def samples_per_class(self) -> int:
        return self.members.size(1)

    def positive_index(self) -> Tensor:
        """For every sample k of a class, the batch index of sample k + 1 (mod K) of that class."""
        return self.members[self.class_index, (self.position + 1) % self.samples_per_class]


def class_layout(labels: Tensor) -> ClassLayout:
    """Derives the :class:`ClassLayout` of a batch from its labels: classes ascending, the samples
    of each class in batch order (sample k of a class has sample k + 1 mod K as its positive).

    Args:
        labels: Labels of shape (N,).

    Raises:
        ValueError: If the batch is not class-balanced with K >= 2 samples per class and at least
            two classes, naming the class counts.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape [N], got {tuple(labels.shape)}")
    classes, class_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if classes.numel() < 2 or counts.min() != counts.max() or int(counts[0]) < 2:
        described = ", ".join(f"{c}: {n}" for c, n in zip(classes.tolist(), counts.tolist()))
        raise ValueError(
            "GCA-HNG needs a class-balanced batch (at least 2 classes, every class exactly K >= 2 "
            f"samples) but got class counts {{{described}}}; sample batches with "
            "gca_pyg.data.ClassBalancedBatchSampler"
        )
    samples_per_class = int(counts[0])
    order = torch.sort(class_index, stable=True).indices
    members = order.view(classes.numel(), samples_per_class)
    position = torch.empty_like(class_index)
    position[members] = torch.arange(samples_per_class, device=labels.device).expand_as(members)
    return ClassLayout(classes=classes, members=members, class_index=class_index, position=position)
