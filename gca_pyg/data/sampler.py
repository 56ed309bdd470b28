"""Class-balanced batches: C classes × K samples each, classes drawn sample- or class-uniformly."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

CLASS_SAMPLING = ("balanced", "uniform")


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` (C) distinct classes × ``samples_per_class`` (K) samples.

    Two schemes choose the classes (``class_sampling``):

    - ``"balanced"`` (sample-uniform): per epoch, each class's samples are shuffled and cut into
      chunks of K; the last chunk of a class whose size is not a multiple of K is topped up from the
      start of its queue. A class of n samples thus has ``ceil(n / K)`` chunks and every sample
      appears at least once. Batches take C chunks of distinct classes: classes whose remaining
      chunks would otherwise not fit into the remaining batches go first, the rest are drawn at
      random weighted by their remaining chunks, so large classes are spread over the epoch. The
      epoch has the largest number of batches the chunks can fill with C distinct classes each (all
      of them unless one class holds more than a 1/C share); the chunks that cannot fill a whole
      batch wait for the next epoch.
    - ``"uniform"`` (class-uniform, the authors' sampler): every batch draws C distinct classes
      uniformly at random, whatever their sizes. Each class keeps a cursor through a shuffled list
      of its samples and hands out the next K; when fewer than K are left, the list is reshuffled
      and the cursor restarts. An epoch has ``len(labels) // (C * K)`` batches and starts every
      class from a fresh shuffle.

    In both, a class with fewer than K samples repeats them (drawn with replacement, one warning
    counting such classes), and a batch lists its classes' samples contiguously, K at a time.

    The order is a function of ``(seed, epoch)`` only: call :meth:`set_epoch` before each epoch
    (as with ``DistributedSampler``); :meth:`state_dict` holds both, so a resumed run reproduces the
    same batches. With ``num_replicas`` W processes, every rank iterates the same global batches and
    yields its share of each: rank r gets the classes ``[floor(r * C / W), floor((r + 1) * C / W))``
    of the batch (in the batch's class order), each with its K samples, so every process holds
    whole classes (one more or one fewer than another process where W does not divide C) and all
    ranks yield the same number of batches.

    Args:
        labels: the class of every sample (any integers).
        classes_per_batch: C, the number of distinct classes in a (global) batch.
        samples_per_class: K, the samples of each class in a batch.
        class_sampling: ``"balanced"`` or ``"uniform"``, see above.
        seed: the random seed.
        num_replicas: W, the number of processes sharing each batch, at most C.
        rank: this process's rank in ``0..num_replicas-1``.
    """

    def __init__(
        self,
        labels,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        class_sampling: str = "balanced",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, not of shape {labels.shape}")
        if classes_per_batch < 2 or samples_per_class < 1:
            raise ValueError(
                f"need classes_per_batch >= 2 and samples_per_class >= 1, not "
                f"{classes_per_batch} and {samples_per_class}"
            )
        if class_sampling not in CLASS_SAMPLING:
            raise ValueError(
                f"unknown class_sampling {class_sampling!r}; choose one of "
                f"{', '.join(CLASS_SAMPLING)}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, not {rank}")
        if classes_per_batch < num_replicas:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} is fewer than the "
                f"{num_replicas} processes: every process holds whole classes of "
                "each batch; set classes_per_batch (data.classes_per_batch) to at "
                f"least {num_replicas}"
            )
        classes, self._class_of, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        if len(classes) < classes_per_batch:
            raise ValueError(
                f"the labels hold {len(classes)} classes, fewer than "
                f"classes_per_batch={classes_per_batch}; lower classes_per_batch"
            )
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.class_sampling = class_sampling
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self._sizes = sizes
        self._chunks = -(-sizes // samples_per_class)
        if class_sampling == "balanced":
            self.batches_per_epoch = _max_batches(self._chunks, classes_per_batch)
        else:
            self.batches_per_epoch = len(labels) // (classes_per_batch * samples_per_class)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(labels)} samples fill no batch of {classes_per_batch} classes "
                f"× {samples_per_class} samples; lower classes_per_batch or "
                "samples_per_class"
            )
        small = int((sizes < samples_per_class).sum())
        if small:
            warnings.warn(
                f"{small} of {len(classes)} classes have fewer than {samples_per_class} "
                f"samples; their batches repeat samples (drawn with replacement)",
                UserWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[list[int]]:
        first = self.rank * self.classes_per_batch // self.num_replicas
        last = (self.rank + 1) * self.classes_per_batch // self.num_replicas
        start, stop = first * self.samples_per_class, last * self.samples_per_class
        for batch in self._epoch_batches():
            yield batch[start:stop]

    def _epoch_batches(self) -> list[list[int]]:
        """All global batches of the epoch, the same on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.class_sampling == "uniform":
            return self._uniform_batches(rng)
        return self._balanced_batches(rng)

    def _balanced_batches(self, rng: np.random.Generator) -> list[list[int]]:
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

    def _uniform_batches(self, rng: np.random.Generator) -> list[list[int]]:
        K, C, B = self.samples_per_class, self.classes_per_batch, self.batches_per_epoch
        sizes = self._sizes
        num_classes = len(sizes)
        chosen = np.stack([rng.choice(num_classes, C, replace=False) for _ in range(B)]).ravel()
        # The m-th draw of a class in this epoch takes its m-th group of K samples.
        by_class = np.argsort(chosen, kind="stable")
        draws = np.bincount(chosen, minlength=num_classes)
        first_draw = np.cumsum(draws) - draws
        draw_number = np.empty_like(chosen)
        draw_number[by_class] = np.arange(len(chosen)) - first_draw[chosen[by_class]]

        # A pass through a class's shuffled samples serves size // K draws; then it is reshuffled.
        # Lay out one shuffled copy of the class per pass the epoch needs, all passes end to end.
        members = np.argsort(self._class_of, kind="stable")
        class_start = np.cumsum(sizes) - sizes
        per_pass = sizes // K
        passes = np.where(per_pass > 0, -(-draws // np.maximum(per_pass, 1)), 0)
        pass_class = np.repeat(np.arange(num_classes), passes)
        pass_start = np.cumsum(sizes[pass_class]) - sizes[pass_class]
        slot_pass = np.repeat(np.arange(len(pass_class)), sizes[pass_class])
        slot_sample = members[
            class_start[pass_class[slot_pass]] + np.arange(len(slot_pass)) - pass_start[slot_pass]
        ]
        shuffled = slot_sample[np.lexsort((rng.random(len(slot_pass)), slot_pass))]

        batches = np.empty((len(chosen), K), dtype=np.int64)
        full = per_pass[chosen] > 0
        classes, number = chosen[full], draw_number[full]
        first_pass = np.cumsum(passes) - passes
        pass_index = first_pass[classes] + number // per_pass[classes]
        offsets = pass_start[pass_index] + (number % per_pass[classes]) * K
        batches[full] = shuffled[offsets[:, None] + np.arange(K)]
        # Classes of fewer than K samples: K draws with replacement.
        small = chosen[~full]
        picks = (rng.random((len(small), K)) * sizes[small, None]).astype(np.int64)
        batches[~full] = members[class_start[small, None] + picks]
        return batches.reshape(B, C * K).tolist()


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
