"""ClassBalancedBatchSampler: balance, coverage, determinism, DDP ranks, resumption."""

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from gca_pyg.data import ClassBalancedBatchSampler


def uneven_labels(seed=0, classes=30):
    """Class sizes 3..12, shuffled positions."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), rng.integers(3, 13, classes))
    return labels[rng.permutation(len(labels))]


def check_balanced(batch, labels, C, K):
    """C distinct classes × K samples each, every class's samples contiguous."""
    assert len(batch) == C * K
    batch_labels = labels[batch].reshape(C, K)
    assert (batch_labels == batch_labels[:, :1]).all()
    assert len(set(batch_labels[:, 0].tolist())) == C


def test_every_batch_is_c_classes_times_k_samples():
    labels = uneven_labels()
    sampler = ClassBalancedBatchSampler(labels, 6, 3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        check_balanced(batch, labels, 6, 3)


def test_every_sample_is_seen_about_once_per_epoch():
    labels = uneven_labels()
    sizes = np.bincount(labels)
    chunks = -(-sizes // 3)  # each class is cut into ceil(size / K) chunks of K
    sampler = ClassBalancedBatchSampler(labels, 6, 3)
    assert len(sampler) == chunks.sum() // 6
    left_over = chunks.sum() - 6 * len(sampler)  # chunks that cannot fill a whole batch
    draws = Counter(int(labels[batch[k]]) for batch in sampler for k in range(0, 18, 3))
    assert sum(chunks[c] - draws[c] for c in range(30)) == left_over
    assert all(0 <= chunks[c] - draws[c] <= 1 for c in range(30))
    seen = Counter(i for batch in sampler for i in batch)
    assert len(labels) - len(seen) <= 3 * left_over
    # Repeats come only from topping up a class's last chunk: at most K - 1 per class.
    assert max(seen.values()) <= 2 and sum(seen.values()) - len(seen) <= 2 * 30


def test_length_is_the_most_batches_of_distinct_classes():
    # One class holds half the samples: it can join at most one batch per other chunk.
    labels = np.repeat(np.arange(5), [40, 4, 4, 4, 4])
    sampler = ClassBalancedBatchSampler(labels, 2, 2)
    # Chunks: 20 of class 0, 2 of each other (8): 8 batches pair them with class 0, then
    # class 0 alone cannot fill a batch. Every epoch must find that arrangement.
    assert len(sampler) == 8
    for epoch in range(20):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 8
        for batch in batches:
            check_balanced(batch, labels, 2, 2)
            assert 0 in labels[batch]
        assert len(set(i for batch in batches for i in batch)) == 32  # no chunk drawn twice


def test_which_classes_wait_for_the_next_epoch_varies():
    labels = np.repeat(np.arange(3), 2)  # three chunks, one batch of two classes per epoch
    sampler = ClassBalancedBatchSampler(labels, 2, 2)
    left_out = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        (batch,) = list(sampler)
        left_out |= {0, 1, 2} - set(labels[batch].tolist())
    assert left_out == {0, 1, 2}


def test_fixed_seed_and_epoch_give_the_same_batches():
    labels = torch.as_tensor(uneven_labels())
    first = list(ClassBalancedBatchSampler(labels, 5, 2, seed=3))
    assert first == list(ClassBalancedBatchSampler(labels, 5, 2, seed=3))
    assert first != list(ClassBalancedBatchSampler(labels, 5, 2, seed=4))
    sampler = ClassBalancedBatchSampler(labels, 5, 2, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_state_dict_resumes_the_same_batches():
    labels = uneven_labels()
    sampler = ClassBalancedBatchSampler(labels, 5, 2, seed=7)
    sampler.set_epoch(4)
    expected = list(sampler)
    resumed = ClassBalancedBatchSampler(labels, 5, 2)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.state_dict() == {"seed": 7, "epoch": 4}
    assert list(resumed) == expected


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_ranks_get_disjoint_batches_of_equal_number(drop_last):
    labels = np.repeat(np.arange(20), 4)  # multiples of K: no top-up, so batches are disjoint
    ranks = [ClassBalancedBatchSampler(labels, 3, 2, num_replicas=3, rank=r, drop_last=drop_last)
             for r in range(3)]
    single = list(ClassBalancedBatchSampler(labels, 3, 2))
    assert len(single) == 13  # 40 chunks of 2, 3 classes per batch
    per_rank = [list(sampler) for sampler in ranks]
    expected = [4 if drop_last else 5] * 3
    assert [len(batches) for batches in per_rank] == [len(s) for s in ranks] == expected
    if drop_last:
        indices = [i for batches in per_rank for batch in batches for i in batch]
        assert len(indices) == len(set(indices))
        assert sorted(map(tuple, sum(per_rank, []))) == sorted(map(tuple, single[:12]))
    else:  # the two missing batches repeat the epoch's first two
        assert per_rank[1][-1] == single[0] and per_rank[2][-1] == single[1]


def test_small_classes_are_drawn_with_replacement_and_counted_in_one_warning():
    labels = np.repeat(np.arange(4), [1, 2, 3, 3])
    with pytest.warns(UserWarning, match="2 of 4 classes have fewer than 3 samples") as record:
        sampler = ClassBalancedBatchSampler(labels, 2, 3)
    assert len(record) == 1
    batches = list(sampler)
    assert len(batches) == 2
    for batch in batches:
        check_balanced(batch, labels, 2, 3)
    assert {i for batch in batches for i in batch} == set(range(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassBalancedBatchSampler(labels, 2, 1)


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="3 classes, fewer than classes_per_batch=4"):
        ClassBalancedBatchSampler([0, 0, 1, 1, 2, 2], 4, 2)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        ClassBalancedBatchSampler([0, 0, 1, 1], 2, 2, num_replicas=2, rank=2)


def test_works_as_a_dataloader_batch_sampler():
    labels = uneven_labels()
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(dataset,
                                         batch_sampler=ClassBalancedBatchSampler(labels, 4, 2))
    _, batch_labels = next(iter(loader))
    assert batch_labels.view(4, 2).unique(dim=0).shape == (4, 2)
