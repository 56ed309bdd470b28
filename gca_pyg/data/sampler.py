"""Class-balanced batches: C classes × K samples each, every sample about once per epoch."""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` (C) distinct classes × ``samples_per_class`` (K) samples.

    Per epoch, each class's samples are shuffled and cut into chunks of K; the last chunk of a class
    whose size is not a multiple of K is topped up from the start of its queue, and a class with
    fewer than K samples repeats them (drawn with replacement, one warning counting such classes).
    A class of n samples thus has ``ceil(n / K)`` chunks and every sample appears at least once.
    Batches take C chunks of distinct classes: classes whose remaining chunks would otherwise not
    fit into the remaining batches go first, the rest are drawn at random weighted by their
    remaining chunks, so large classes are spread over the epoch. The epoch has the largest number
    of batches the chunks can fill with C distinct classes each (all of them unless one class holds
    more than a 1/C share); the chunks that cannot fill a whole batch wait for the next epoch.
    A batch lists its classes' samples contiguously, K at a time.

    The order is a function of ``(seed, epoch)`` only: call :meth:`set_epoch` before each epoch
    (as with ``DistributedSampler``); :meth:`state_dict` holds both, so a resumed run reproduces the
    same batches. Under DDP every rank builds the same epoch and takes every
    ``num_replicas``-th batch from ``rank`` on: ranks get different batches and the same number of
    them — with ``drop_last`` the tail batches that do not divide evenly are dropped, without it
    batches from the epoch's start are repeated to even them out.

    Args:
        labels: the class of every sample (any integers).
        classes_per_batch: C, the number of distinct classes in a batch.
        samples_per_class: K, the samples of each class in a batch.
        seed: the random seed.
        drop_last: between ranks, drop (``True``) or repeat (``False``) batches to even them out.
        num_replicas: the number of DDP processes.
        rank: this process's rank in ``0..num_replicas-1``.
    """

    def __init__(self, labels, classes_per_batch: int, samples_per_class: int, *, seed: int = 0,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0):
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, not of shape {labels.shape}")
        if classes_per_batch < 2 or samples_per_class < 1:
            raise ValueError(f"need classes_per_batch >= 2 and samples_per_class >= 1, not "
                             f"{classes_per_batch} and {samples_per_class}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, not {rank}")
        classes, self._class_of, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        if len(classes) < classes_per_batch:
            raise ValueError(f"the labels hold {len(classes)} classes, fewer than "
                             f"classes_per_batch={classes_per_batch}; lower classes_per_batch")
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.epoch = 0
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self._sizes = sizes
        self._chunks = -(-sizes // samples_per_class)
        self.batches_per_epoch = _max_batches(self._chunks, classes_per_batch)
        if len(self) == 0:
            raise ValueError(f"an epoch has {self.batches_per_epoch} batches, too few for "
                             f"{num_replicas} replicas; use drop_last=False or smaller batches")
        small = int((sizes < samples_per_class).sum())
        if small:
            warnings.warn(f"{small} of {len(classes)} classes have fewer than {samples_per_class} "
                          f"samples; their batches repeat samples (drawn with replacement)",
                          UserWarning, stacklevel=2)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.drop_last:
            return self.batches_per_epoch // self.num_replicas
        return -(-self.batches_per_epoch // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        total = len(self) * self.num_replicas
        # Wrap around (only without drop_last) so that every rank gets len(self) batches.
        batches = [batches[i % len(batches)] for i in range(total)]
        yield from batches[self.rank::self.num_replicas]

    def _epoch_batches(self) -> list[list[int]]:
        """All batches of the epoch, the same on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        K, C = self.samples_per_class, self.classes_per_batch
        # Each class's samples in random order, classes one after another.
        queue = np.lexsort((rng.random(len(self._class_of)), self._class_of))
        starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        remaining = np.minimum(self._chunks, self.batches_per_epoch)
        drawn = np.zeros_like(remaining)
        batches = []
        for left in range(self.batches_per_epoch, 0, -1):
            remaining = np.minimum(remaining, left)
            chosen = _choose_classes(remaining, left, C, rng)
            # Chunk t of class c: positions t*K .. t*K+K-1 of its queue, wrapping past its end.
            offsets = drawn[chosen, None] * K + np.arange(K)
            positions = starts[chosen, None] + offsets % self._sizes[chosen, None]
            batches.append(queue[positions].ravel().tolist())
            remaining[chosen] -= 1
            drawn[chosen] += 1
        return batches


def _max_batches(chunks: np.ndarray, C: int) -> int:
    """The most batches of C distinct classes that ``chunks[c]`` chunks per class can fill.

    B batches are possible iff ``sum(min(chunks, B)) >= C * B`` (no class is in a batch twice);
    the left side minus the right is concave in B, so the feasible B form an interval from 0.
    """
    low, high = 0, int(chunks.sum()) // C
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(chunks, middle).sum() >= C * middle:
            low = middle
        else:
            high = middle - 1
    return low


def _choose_classes(remaining: np.ndarray, left: int, C: int, rng: np.random.Generator):
    """C distinct classes for the next of ``left`` batches, keeping the rest feasible.

    Classes with a chunk for every remaining batch must be chosen now; the others are drawn
    without replacement with probability proportional to their remaining chunks (Gumbel top-k).
    """
    forced = np.flatnonzero(remaining == left)
    if len(forced) >= C:
        return rng.choice(forced, C, replace=False)
    keys = np.log(remaining, where=remaining > 0, out=np.full(len(remaining), -np.inf))
    keys -= np.log(-np.log(rng.random(len(remaining))))
    keys[forced] = np.inf
    return np.argpartition(-keys, C - 1)[:C]
