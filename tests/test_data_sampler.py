"""ClassBalancedBatchSampler: balance, coverage, both class-sampling schemes, determinism,
processes sharing a batch, resumption."""

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


SCHEMES = ["balanced", "uniform"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_batch_is_c_classes_times_k_samples(scheme):
    labels = uneven_labels()
    sampler = ClassBalancedBatchSampler(labels, 6, 3, class_sampling=scheme)
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


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fixed_seed_and_epoch_give_the_same_batches(scheme):
    labels = torch.as_tensor(uneven_labels())
    first = list(ClassBalancedBatchSampler(labels, 5, 2, seed=3, class_sampling=scheme))
    assert first == list(ClassBalancedBatchSampler(labels, 5, 2, seed=3, class_sampling=scheme))
    assert first != list(ClassBalancedBatchSampler(labels, 5, 2, seed=4, class_sampling=scheme))
    sampler = ClassBalancedBatchSampler(labels, 5, 2, seed=3, class_sampling=scheme)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_resumes_the_same_batches(scheme):
    labels = uneven_labels()
    sampler = ClassBalancedBatchSampler(labels, 5, 2, seed=7, class_sampling=scheme)
    sampler.set_epoch(4)
    expected = list(sampler)
    resumed = ClassBalancedBatchSampler(labels, 5, 2, class_sampling=scheme)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.state_dict() == {"seed": 7, "epoch": 4}
    assert list(resumed) == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ranks_share_every_batch_by_whole_classes(scheme):
    labels = uneven_labels()
    single = ClassBalancedBatchSampler(labels, 6, 2, seed=5, class_sampling=scheme)
    single.set_epoch(2)
    ranks = [
        ClassBalancedBatchSampler(
            labels, 6, 2, seed=5, class_sampling=scheme, num_replicas=3, rank=r
        )
        for r in range(3)
    ]
    for sampler in ranks:
        sampler.set_epoch(2)
    expected = list(single)
    per_rank = [list(sampler) for sampler in ranks]
    assert [len(batches) for batches in per_rank] == [len(s) for s in ranks] == [len(expected)] * 3
    for step, batch in enumerate(expected):
        shares = [batches[step] for batches in per_rank]
        assert sum(shares, []) == batch  # rank r holds classes 2r, 2r+1 of the batch, in order
        for share in shares:
            check_balanced(share, labels, 2, 2)


def test_ranks_share_an_odd_number_of_classes_by_whole_classes():
    labels = uneven_labels()
    single = ClassBalancedBatchSampler(labels, 5, 2, seed=1)
    ranks = [
        ClassBalancedBatchSampler(labels, 5, 2, seed=1, num_replicas=2, rank=r) for r in range(2)
    ]
    for batch, first, second in zip(single, *ranks):
        assert (len(first), len(second)) == (4, 6)  # 2 and 3 classes of K = 2
        assert first + second == batch


def test_more_processes_than_classes_are_a_clear_error():
    message = (
        r"classes_per_batch=2 is fewer than the 3 processes: .*set classes_per_batch "
        r"\(data.classes_per_batch\) to at least 3"
    )
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(uneven_labels(), 2, 2, num_replicas=3, rank=0)


def test_uniform_sampling_draws_classes_whatever_their_size():
    # Class 0 holds most samples; nine classes hold 4 each.
    labels = np.repeat(np.arange(10), [200] + [4] * 9)
    draws = {}
    for scheme in SCHEMES:
        sampler = ClassBalancedBatchSampler(labels, 2, 2, class_sampling=scheme)
        counts = Counter()
        for epoch in range(5):
            sampler.set_epoch(epoch)
            counts.update(int(labels[batch[0]]) for batch in sampler)
            counts.update(int(labels[batch[2]]) for batch in sampler)
        draws[scheme] = counts
    # Sample-uniform: class 0 is in every batch. Class-uniform: in about 2/10 of them (59 a epoch).
    assert len(ClassBalancedBatchSampler(labels, 2, 2, class_sampling="uniform")) == 236 // 4
    assert draws["balanced"][0] == 5 * len(ClassBalancedBatchSampler(labels, 2, 2))
    assert 30 <= draws["uniform"][0] <= 90  # 59 expected over 5 epochs of 59 batches
    assert min(draws["uniform"][c] for c in range(1, 10)) >= 30


def test_uniform_sampling_walks_a_shuffled_list_per_class():
    # K = 2. A pass through a class's shuffled list serves 3 draws for the classes of 7 samples (6
    # distinct samples, one left over) and 1 draw for the class of 3; then the list is reshuffled.
    labels = np.repeat(np.arange(4), [7, 7, 7, 3])
    sampler = ClassBalancedBatchSampler(labels, 2, 2, class_sampling="uniform")
    left_over, pairs_of_the_small_class = set(), []
    for epoch in range(10):
        sampler.set_epoch(epoch)
        per_class = {c: [] for c in range(4)}
        for batch in sampler:
            for k in (0, 2):
                per_class[int(labels[batch[k]])].append(batch[k : k + 2])
        for c in range(3):
            draws = per_class[c]
            for start in range(0, len(draws), 3):
                samples = sum(draws[start : start + 3], [])
                assert len(set(samples)) == len(samples)
            if len(draws) >= 3:
                left_over |= set(range(7 * c, 7 * c + 7)) - set(sum(draws[:3], []))
        pairs_of_the_small_class.append({frozenset(pair) for pair in per_class[3]})
    assert len(left_over) > 8  # which sample sits out varies with the shuffle
    # Reshuffled after every draw: the small class's pairs vary within an epoch.
    assert any(len(pairs) > 1 for pairs in pairs_of_the_small_class)


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
    with pytest.warns(UserWarning, match="2 of 4 classes"):
        uniform = ClassBalancedBatchSampler(labels, 2, 3, class_sampling="uniform")
    seen = set()
    for epoch in range(10):
        uniform.set_epoch(epoch)
        (batch,) = list(uniform)  # 9 // 6
        check_balanced(batch, labels, 2, 3)
        seen |= set(batch)
    assert seen == set(range(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassBalancedBatchSampler(labels, 2, 1)


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="3 classes, fewer than classes_per_batch=4"):
        ClassBalancedBatchSampler([0, 0, 1, 1, 2, 2], 4, 2)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        ClassBalancedBatchSampler([0, 0, 1, 1], 2, 2, num_replicas=2, rank=2)
    with pytest.raises(
        ValueError, match="unknown class_sampling 'random'; choose one of balanced, uniform"
    ):
        ClassBalancedBatchSampler([0, 0, 1, 1], 2, 2, class_sampling="random")
    with pytest.raises(ValueError, match="4 samples fill no batch of 2 classes × 3 samples"):
        ClassBalancedBatchSampler([0, 0, 1, 1], 2, 3, class_sampling="uniform")


def test_works_as_a_dataloader_batch_sampler():
    labels = uneven_labels()
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=ClassBalancedBatchSampler(labels, 4, 2)
    )
    _, batch_labels = next(iter(loader))
    assert batch_labels.view(4, 2).unique(dim=0).shape == (4, 2)


@pytest.mark.parametrize(
    "recipe, scheme, replicas", [("sop", "uniform", 2), ("cub", "balanced", 3)]
)
def test_the_config_sets_the_scheme_and_the_ranks(recipe, scheme, replicas):
    from gca_pyg.config import load_config
    from gca_pyg.pipeline import build_train_sampler

    config = load_config(recipe, ["train.seed=3"])
    labels = np.repeat(np.arange(60), 6)
    sampler = build_train_sampler(config, labels, num_replicas=replicas, rank=1)
    C, K = config.data.classes_per_batch, config.data.samples_per_class
    assert (sampler.class_sampling, sampler.seed) == (scheme, 3)
    share = C // replicas * K
    expected = ClassBalancedBatchSampler(labels, C, K, class_sampling=scheme, seed=3)
    assert [batch[share : 2 * share] for batch in expected] == list(sampler)
