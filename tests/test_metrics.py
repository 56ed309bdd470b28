import math
import warnings

import numpy as np
import pytest
import torch

from gca_pyg.metrics import retrieval_metrics


def on_circle(degrees):
    """Unit vectors at the given angles: cosine similarity ranks by angular distance."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def metrics_from_relevance(rankings, ks):
    """Recall@K, MAP@R and RP from each query's ranking, '1' marking a same-class item."""
    recall = {k: 0.0 for k in ks}
    average_precision = r_precision = 0.0
    for ranking in rankings:
        hits = [c == "1" for c in ranking]
        r = sum(hits)
        for k in ks:
            recall[k] += any(hits[:k]) / len(rankings)
        r_precision += sum(hits[:r]) / r / len(rankings)
        precisions = [sum(hits[: i + 1]) / (i + 1) for i in range(r) if hits[i]]
        average_precision += sum(precisions) / r / len(rankings)
    recalls = {f"recall@{k}": recall[k] for k in ks}
    return {**recalls, "map@r": average_precision, "r_precision": r_precision}


def brute_force(gallery, gallery_labels, ks, query=None, query_labels=None):
    """The metrics from a full float64 similarity matrix and a full sort, query by query."""
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    self_retrieval = query is None
    if self_retrieval:
        query, query_labels = gallery, gallery_labels
    else:
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
    similarity = query.astype(np.float64) @ gallery.astype(np.float64).T
    recall, average_precisions, r_precisions = {k: [] for k in ks}, [], []
    for i in range(len(query)):
        order = np.argsort(-similarity[i], kind="stable")
        if self_retrieval:
            order = order[order != i]
        hits = gallery_labels[order] == query_labels[i]
        r = int(hits.sum())
        if r == 0:
            continue
        for k in ks:
            recall[k].append(hits[:k].any())
        r_precisions.append(hits[:r].mean())
        precision_at = np.cumsum(hits[:r]) / np.arange(1, r + 1)
        average_precisions.append((precision_at * hits[:r]).sum() / r)
    return {
        **{f"recall@{k}": float(np.mean(recall[k])) for k in ks},
        "map@r": float(np.mean(average_precisions)),
        "r_precision": float(np.mean(r_precisions)),
    }


def clustered(n_classes, sizes, dim, spread, seed):
    """Gaussian clusters, ``sizes`` drawn per class from the given range, rows shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), rng.integers(sizes[0], sizes[1] + 1, n_classes))
    centres = rng.standard_normal((n_classes, dim))
    embeddings = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    order = rng.permutation(len(labels))
    return embeddings[order].astype(np.float32), labels[order]


def assert_metrics_equal(actual, expected, tolerance=1e-9):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=tolerance), key


def test_hand_made_embeddings_give_the_metrics_worked_out_by_hand():
    # Angles and classes; each string below lists, for one query, whether each other point (in
    # order of angular distance) has the query's class. E.g. query 7 (C, 140°): 4 (A, 35° away),
    # 5 (C, 45°), 3 (B, 50°), 6 (C, 60°), 2, 1, 0.
    degrees = [0, 12, 30, 90, 105, 185, 200, 140]
    labels = np.array(list("AABBACCC"))
    rankings = [
        "1001000",
        "1001000",
        "0010000",
        "0010000",
        "0000101",
        "1100000",
        "1100000",
        "0101000",
    ]
    ks = (1, 2, 4, 8)

    metrics = retrieval_metrics(on_circle(degrees), labels, ks)

    assert_metrics_equal(metrics, metrics_from_relevance(rankings, ks))
    # The same numbers, spelled out: first hits at ranks 0,0,2,2,4,0,0,1; RP and AP per query
    # 1/2,1/2,0,0,0,1,1,1/2 and 1/2,1/2,0,0,0,1,1,1/4.
    assert_metrics_equal(
        metrics,
        {
            "recall@1": 4 / 8,
            "recall@2": 5 / 8,
            "recall@4": 7 / 8,
            "recall@8": 1.0,
            "map@r": 3.25 / 8,
            "r_precision": 3.5 / 8,
        },
    )


def test_query_mode_searches_the_gallery_without_excluding_identical_vectors():
    gallery = on_circle([0, 40, 90, 180])
    gallery_labels = np.array(list("ABAB"))
    # 10° A: 0 A, 40 B, 90 A, 180 B -> 1010;  100° B: 90 A, 40 B, 180 B, 0 A -> 0110;
    # 0° A is gallery item 0's own vector, which must count: 1010.  200° C has no gallery match.
    query = on_circle([10, 100, 0, 200])
    query_labels = np.array(list("ABAC"))

    with pytest.warns(UserWarning, match="1 of 4 queries"):
        metrics = retrieval_metrics(
            gallery, gallery_labels, (1, 2), query=query, query_labels=query_labels
        )

    assert_metrics_equal(metrics, metrics_from_relevance(["1010", "0110", "1010"], (1, 2)))
    assert_metrics_equal(
        metrics, {"recall@1": 2 / 3, "recall@2": 1.0, "map@r": 5 / 12, "r_precision": 1 / 2}
    )


def test_an_identical_same_class_sample_still_counts():
    # Classes A (two copies of one vector), B and C (near pairs). Every query's nearest other item
    # is of its class; excluding "the item identical to the query" instead of the query's own
    # index would lose A's hits.
    e = np.eye(3, dtype=np.float32)
    x = np.stack([e[0], e[0], e[1], e[1] + 0.2 * e[2], e[2], e[2] + 0.2 * e[1]])
    metrics = retrieval_metrics(x, np.array(list("AABBCC")))
    assert metrics["recall@1"] == metrics["map@r"] == metrics["r_precision"] == 1.0


@pytest.mark.parametrize("chunk_size", [4096, 2])
def test_another_class_tied_with_a_positive_ranks_before_it(chunk_size):
    # Exactly representable scores: every sample is the same axis vector, so all scores are 1.
    # Each query then has 4 negatives tied with its one positive, which therefore ranks 5th.
    # With chunk_size=2 every class is a group of its own, so the ties are in other groups' tiles.
    collapsed = np.tile(np.eye(3, dtype=np.float32)[0], (6, 1))
    metrics = retrieval_metrics(
        collapsed, np.array([0, 0, 1, 1, 2, 2]), ks=(1, 4, 5), chunk_size=chunk_size
    )
    assert metrics == {
        "recall@1": 0.0,
        "recall@4": 0.0,
        "recall@5": 1.0,
        "map@r": 0.0,
        "r_precision": 0.0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_random_embeddings_match_brute_force(seed, spread):
    x, y = clustered(n_classes=30, sizes=(1, 9), dim=12, spread=spread, seed=seed)
    ks = (1, 2, 5, 10, 50, 1000)  # K beyond R_max and beyond N take the counting path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singleton classes are expected here
        metrics = retrieval_metrics(x, y, ks, chunk_size=16)
    assert_metrics_equal(metrics, brute_force(x, y, ks))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_query_gallery_split_matches_brute_force(seed):
    x, y = clustered(n_classes=25, sizes=(2, 8), dim=10, spread=1.5, seed=seed)
    query, query_labels, gallery, gallery_labels = x[:60], y[:60], x[60:], y[60:]
    ks = (1, 10, 20, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = retrieval_metrics(
            gallery, gallery_labels, ks, query=query, query_labels=query_labels, chunk_size=9
        )
    assert_metrics_equal(metrics, brute_force(gallery, gallery_labels, ks, query, query_labels))


def test_queries_without_positives_are_left_out_with_a_warning():
    x, y = clustered(n_classes=12, sizes=(2, 5), dim=6, spread=1.0, seed=3)
    x = np.concatenate([x, np.ones((2, 6), np.float32)])
    y = np.concatenate([y, [100, 101]])  # two singleton classes: gallery items, not queries
    with pytest.warns(UserWarning, match=f"2 of {len(y)} queries"):
        metrics = retrieval_metrics(x, y)
    assert_metrics_equal(metrics, brute_force(x, y, (1, 2, 4, 8)))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 40])
def test_any_chunk_size_gives_the_answer_of_one_chunk(chunk_size):
    # Classes of up to 25 rows: larger than most chunk sizes here, so groups get cut.
    x, y = clustered(n_classes=20, sizes=(2, 25), dim=8, spread=2.0, seed=4)
    ks = (1, 3, 30, 300)
    whole = retrieval_metrics(x, y, ks, chunk_size=100_000)
    assert retrieval_metrics(x, y, ks, chunk_size=chunk_size) == pytest.approx(whole, abs=1e-12)
    split = {"query": x[:50], "query_labels": y[:50]}
    query_mode_whole = retrieval_metrics(x[50:], y[50:], ks, **split, chunk_size=100_000)
    query_mode = retrieval_metrics(x[50:], y[50:], ks, **split, chunk_size=chunk_size)
    assert query_mode == pytest.approx(query_mode_whole, abs=1e-12)


def test_the_number_of_threads_does_not_change_the_result():
    # Many small tiles, classes of up to 25 rows, and far negatives: the bands of a tile cut
    # classes, queries and their candidates in different places for each thread count.
    x, y = clustered(n_classes=40, sizes=(2, 25), dim=8, spread=2.5, seed=11)
    ks = (1, 5, 50, 500)
    split = {"query": x[:150], "query_labels": y[:150]}
    one_thread = retrieval_metrics(x, y, ks, chunk_size=37, num_threads=1)
    query_mode = retrieval_metrics(x[150:], y[150:], ks, **split, chunk_size=37, num_threads=1)
    assert_metrics_equal(one_thread, brute_force(x, y, ks))
    for num_threads in (2, 3, 64):
        assert retrieval_metrics(x, y, ks, chunk_size=37, num_threads=num_threads) == one_thread
        assert (
            retrieval_metrics(x[150:], y[150:], ks, **split, chunk_size=37, num_threads=num_threads)
            == query_mode
        )


def test_torch_tensors_of_any_dtype_give_the_numpy_answer(device):
    x, y = clustered(n_classes=10, sizes=(2, 6), dim=8, spread=1.0, seed=5)
    expected = retrieval_metrics(x, y)
    embeddings = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.from_numpy(y).to(device)
    assert retrieval_metrics(embeddings, labels) == pytest.approx(expected, abs=1e-12)
    half = embeddings.detach().to(torch.bfloat16)
    assert retrieval_metrics(half, labels) == retrieval_metrics(half.float().cpu().numpy(), y)
    string_labels = np.array([f"class-{label}" for label in y])
    assert retrieval_metrics(x, string_labels) == expected


def test_results_are_python_floats_in_the_unit_interval_with_keys_in_order():
    x, y = clustered(n_classes=10, sizes=(2, 6), dim=8, spread=2.0, seed=6)
    metrics = retrieval_metrics(x, y, ks=(1, 10, 100))
    assert list(metrics) == ["recall@1", "recall@10", "recall@100", "map@r", "r_precision"]
    assert all(type(value) is float and 0.0 <= value <= 1.0 for value in metrics.values())


def pml_metrics(gallery, gallery_labels, query=None, query_labels=None):
    """pytorch-metric-learning's numbers (skipped without it), with its default exact k-NN."""
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    calculator = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        device=torch.device("cpu"),
    )
    gallery = torch.nn.functional.normalize(torch.as_tensor(gallery))
    gallery_labels = torch.as_tensor(gallery_labels)
    if query is None:
        return calculator.get_accuracy(gallery, gallery_labels)
    query = torch.nn.functional.normalize(torch.as_tensor(query))
    return calculator.get_accuracy(
        query, torch.as_tensor(query_labels), gallery, gallery_labels, ref_includes_query=False
    )


def assert_matches_pml(ours, theirs):
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("spread", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("duplicates", [False, True])
def test_matches_pytorch_metric_learning(spread, duplicates):
    x, y = clustered(n_classes=40, sizes=(2, 12), dim=16, spread=spread, seed=7)
    if duplicates:  # exact copies of other samples of the same class
        copies = np.flatnonzero(np.diff(y, prepend=-1) == 0)[:50]
        x[copies] = x[copies - 1]
        y[copies] = y[copies - 1]
    assert_matches_pml(retrieval_metrics(x, y, chunk_size=64), pml_metrics(x, y))


def test_query_mode_matches_pytorch_metric_learning():
    x, y = clustered(n_classes=30, sizes=(3, 10), dim=16, spread=1.5, seed=8)
    with pytest.warns(UserWarning, match="of 100 queries have no same-class item"):
        ours = retrieval_metrics(
            x[100:], y[100:], query=x[:100], query_labels=y[:100], chunk_size=64
        )
    assert_matches_pml(ours, pml_metrics(x[100:], y[100:], x[:100], y[:100]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: retrieval_metrics(x, y[:-1]), r"labels must have shape \(20,\)"),
        (lambda x, y: retrieval_metrics(x[0], y), "2-D"),
        (lambda x, y: retrieval_metrics(x[:1], y[:1]), "at least 2 samples"),
        (
            lambda x, y: retrieval_metrics(np.where(np.arange(20)[:, None] == 3, np.nan, x), y),
            "1 rows with NaN.*row 3",
        ),
        (lambda x, y: retrieval_metrics(x, y, ks=(1, 0)), "ks must be positive"),
        (lambda x, y: retrieval_metrics(x, y, ks=()), "ks must be positive"),
        (lambda x, y: retrieval_metrics(x, y, ks=(1.5,)), "ks must be positive"),
        (lambda x, y: retrieval_metrics(x, y, ks=4), "ks must be a sequence"),
        (lambda x, y: retrieval_metrics(x, y, chunk_size=0), "chunk_size"),
        (lambda x, y: retrieval_metrics(x, y, num_threads=0), "num_threads must be a positive"),
        (lambda x, y: retrieval_metrics(x, y, num_threads=2.0), "num_threads must be a positive"),
        (lambda x, y: retrieval_metrics(x, y, query=x), "query and query_labels together"),
        (lambda x, y: retrieval_metrics(x, y, query=x[:, :3], query_labels=y), "3 dimensions"),
        (lambda x, y: retrieval_metrics(x, np.arange(20)), "no query has a same-class item"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    x, y = clustered(n_classes=5, sizes=(4, 4), dim=4, spread=1.0, seed=9)
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(x, y)


def test_an_infinite_embedding_is_reported_like_nan():
    x, y = clustered(n_classes=3, sizes=(3, 3), dim=4, spread=1.0, seed=10)
    x[5, 2] = math.inf
    with pytest.raises(ValueError, match="row 5"):
        retrieval_metrics(x, y)
