"""Exact and approximate inner-product indexes (gca_pyg.vector_index)."""

import faiss
import numpy as np
import pytest

import gca_pyg.vector_index as vector_index
from gca_pyg.errors import ConfigError
from gca_pyg.vector_index import (
    EF_SEARCH_LADDER,
    EXACT_LIMIT,
    RECALL_MARGIN,
    IndexSettings,
    append_rows,
    build_index,
    check_vectors,
    choose_kind,
    exact_search,
    recall_at_k,
    search,
    set_breadth,
    unit_rows,
)


def clustered(count=3000, dim=32, classes=150, spread=0.8, seed=0, queries=0):
    """`count` rows around `classes` centres, then `queries` more of the same classes."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((classes, dim)))
    labels = rng.integers(0, classes, count + queries)
    noise = rng.standard_normal((count + queries, dim)) / np.sqrt(dim)
    rows = unit_rows(centres[labels] + spread * noise)
    return (rows[:count], rows[count:]) if queries else rows


def test_auto_is_exact_up_to_the_limit_then_ivf():
    assert choose_kind("auto", EXACT_LIMIT) == "flat"
    assert choose_kind("auto", EXACT_LIMIT + 1) == "ivf"
    assert choose_kind("ivf", 10) == "ivf"
    with pytest.raises(ConfigError, match="unknown index kind 'annoy'.*flat, ivf, hnsw, ivf-sq8"):
        choose_kind("annoy", 10)


def test_recall_counts_the_exact_neighbours_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [-1, -1, -1, -1]])
    assert recall_at_k(found, exact) == pytest.approx((3 / 4 + 0) / 2)
    assert recall_at_k(exact, exact) == 1.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_kind_holds_row_i_as_id_i_and_reaches_its_target(kind):
    gallery, queries = clustered(queries=200)
    index, settings, order = build_index(gallery, kind, target=0.95, sample=300)
    assert settings.kind == kind and index.ntotal == len(gallery)
    assert sorted(order.tolist()) == list(range(len(gallery)))
    if kind == "flat":
        assert order.tolist() == list(range(len(gallery)))
    else:  # the 300 held-out rows come last
        assert order[:-300].tolist() == sorted(order[:-300].tolist())
    _, found = index.search(gallery[order[:50]], 1)
    assert found[:, 0].tolist() == list(range(50))  # every row finds itself first
    if kind != "flat":
        assert settings.recall_k == 10 and settings.recall_queries == 300
        # The margin: the sample's recall less two standard errors reaches the target.
        assert settings.recall - RECALL_MARGIN * settings.recall_se >= 0.95
        assert 0 < settings.recall_se < 0.02
        # The search stops widening once the target is reached, well before the widest breadth.
        assert (
            1 < (settings.nprobe or settings.ef_search) < (settings.nlist or EF_SEARCH_LADDER[-1])
        )
    # New queries near the gallery: the recall measured on held-out rows carries over.
    _, exact = exact_search(gallery, queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(order[found], exact) >= (1.0 if kind == "flat" else 0.9)


def test_an_unreachable_target_keeps_the_widest_breadth():
    gallery = clustered(2000, spread=3.0)  # nearly uniform: hard for approximate search
    _, settings, _ = build_index(gallery, "ivf", target=1.01, sample=200)
    assert settings.nprobe == settings.nlist and settings.recall <= 1.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_rows_appended_after_a_round_trip_get_the_next_ids(kind, tmp_path):
    gallery = clustered(2000)
    index, settings, _ = build_index(gallery[:1500], kind, sample=100)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    loaded = faiss.read_index(str(tmp_path / "index.faiss"))
    set_breadth(loaded, settings)
    append_rows(loaded, gallery[1500:])
    assert loaded.ntotal == 2000
    _, found = loaded.search(gallery[1500:1520], 1)
    assert found[:, 0].tolist() == list(range(1500, 1520))


def faiss_search(gallery, queries, k):
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(queries, k)


def test_exact_search_in_blocks_finds_what_faiss_finds(monkeypatch):
    """20,000 × 64 queries × 32 is past the one-thread threshold; blocks of 4,096 rows make the
    running top-k merge five times, the last block a short one."""
    gallery, queries = clustered(count=20_000, dim=32, queries=64)
    monkeypatch.setattr(vector_index, "EXACT_BLOCK_SCORES", 4096 * 64)
    scores, ids = exact_search(gallery, queries, 10)
    expected_scores, expected_ids = faiss_search(gallery, queries, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (64, 10)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert (ids == expected_ids).mean() > 0.99  # ties aside, the same rows in the same order
    np.testing.assert_allclose(np.sort(scores, axis=1)[:, ::-1], scores)
    # More neighbours than rows: padded as faiss pads, with -1 and the lowest float.
    monkeypatch.setattr(vector_index, "EXACT_THREADED_WORK", 0)
    scores, ids = exact_search(gallery[:5], queries[:2], 8)
    _, expected_ids = faiss_search(gallery[:5], queries[:2], 8)
    assert ids[:, 5:].tolist() == expected_ids[:, 5:].tolist() == [[-1] * 3] * 2
    assert (scores[:, 5:] == np.finfo(np.float32).min).all()
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_a_flat_index_is_searched_by_blocks_over_its_own_vectors():
    gallery, queries = clustered(count=20_000, dim=32, queries=64)
    index, settings, _ = build_index(gallery, "flat")
    scores, ids = search(index, settings, queries, 5)
    expected_scores, expected_ids = index.search(queries, 5)  # faiss's own loop
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert (ids == expected_ids).mean() > 0.99
    one_scores, one_ids = search(index, settings, queries[:1], 5)  # one query: faiss's loop
    np.testing.assert_array_equal(one_ids, expected_ids[:1])


def test_the_breadth_is_the_first_whose_recall_less_the_margin_reaches_the_target(monkeypatch):
    """Every breadth's recall of the held-out rows, recorded with an unreachable target; then a
    target between one breadth's recall and that less two standard errors: that breadth would
    do without the margin, and the margin passes it by for the first whose lower bound reaches
    the target."""
    gallery = clustered(count=4000, dim=32, classes=200, spread=1.2)
    seen = []
    measure = vector_index.recall_per_query
    monkeypatch.setattr(
        vector_index, "recall_per_query", lambda *args: seen.append(measure(*args)) or seen[-1]
    )
    _, settings, _ = build_index(gallery, "ivf", target=1.01, sample=300)
    ladder = [v for v in vector_index.NPROBE_LADDER if v < settings.nlist] + [settings.nlist]
    assert len(seen) == len(ladder) and settings.nprobe == ladder[-1]
    means = np.array([hits.mean() for hits in seen])
    lows = means - RECALL_MARGIN * np.array([hits.std(ddof=1) / np.sqrt(300) for hits in seen])
    first = next(
        i for i in range(1, len(ladder)) if lows[i] < means[i] < 1 and means[i - 1] < lows[i]
    )
    target = (lows[first] + means[first]) / 2
    seen.clear()
    _, settings, _ = build_index(gallery, "ivf", target=target, sample=300)
    chosen = next(i for i in range(len(ladder)) if lows[i] >= target)
    assert chosen > first and settings.nprobe == ladder[chosen]
    assert settings.recall == pytest.approx(means[chosen], abs=1e-4)
    assert settings.recall - RECALL_MARGIN * settings.recall_se >= target - 1e-4


@pytest.mark.parametrize("kind, bytes_per_row", [("ivf-sq8", 16 + 8), ("ivf-pq", 2 + 8)])
def test_a_compressed_index_is_small_and_reranked_to_exact_scores(kind, bytes_per_row, tmp_path):
    """Codes (16 bytes for SQ8 of 16 dimensions, 2 for PQ2) and an id per row, against 64 bytes
    of floats; the shortlist re-scored from the stored vectors, read through a memory map."""
    gallery, queries = clustered(count=2000, dim=16, classes=80, queries=200)
    index, settings, order = build_index(gallery, kind, sample=200)
    assert settings.rerank == 10 and settings.codes == {"ivf-sq8": "SQ8", "ivf-pq": "PQ2"}[kind]
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    size = (tmp_path / "index.faiss").stat().st_size
    centroids = (settings.nlist + 256) * 16 * 4  # the cells', and PQ's 256 per sub-vector
    assert size < len(gallery) * bytes_per_row + centroids + 4096 and size < 0.6 * gallery.nbytes
    np.save(tmp_path / "vectors.npy", gallery[order])
    vectors = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    scores, ids = search(index, settings, queries, 10, vectors)
    np.testing.assert_allclose(
        scores, np.einsum("qkd,qd->qk", gallery[order][ids], queries), atol=1e-5
    )
    _, exact = exact_search(gallery, queries, 10)
    assert recall_at_k(order[ids], exact) >= 0.95
    # Without re-ranking: the codes' own, approximate, scores.
    plain = IndexSettings(**{**settings.to_dict(), "rerank": None})
    approximate, plain_ids = search(index, plain, queries, 10)
    assert (
        np.abs(approximate - np.einsum("qkd,qd->qk", gallery[order][plain_ids], queries)).max()
        > 1e-4
    )
    with pytest.raises(ValueError, match="re-ranks from the stored vectors"):
        search(index, settings, queries, 10)


def test_ivf_pq_needs_rows_to_train_its_codes():
    with pytest.raises(ConfigError, match="ivf-pq trains its codes on at least 1,000 rows"):
        build_index(clustered(count=500, dim=16), "ivf-pq")


def test_settings_written_before_codes_were_named_still_load():
    settings = IndexSettings.from_dict({"kind": "ivf", "nlist": 64, "nprobe": 4, "recall": 0.96})
    assert settings.factory == "IVF64,Flat" and settings.rerank is None
    assert settings.describe() == "IVF64,Flat (nprobe 4)"


@pytest.mark.parametrize(
    "rows, message",
    [
        (np.ones(4, np.float32), r"are an array of shape \(4,\); expected \(rows, dim\)"),
        (np.ones((3, 4), np.int64), "hold int64 values; expected floating-point"),
        (np.ones((3, 5), np.float32), "have 5 dimensions and the gallery's embeddings 4"),
        (
            np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0], [0, np.inf, 0, 0]], np.float32),
            r"row 1 \(and 1 more\) holds NaN or infinite values",
        ),  # fmt: skip
        (np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float64), "row 1 holds only zeros"),
    ],
)
def test_bad_vectors_are_one_line(rows, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_vectors(rows, "the rows", dim=4)
    assert "\n" not in str(error.value) and str(error.value).startswith("the rows")
    assert check_vectors(np.eye(4, dtype=np.float64), "ok", 4).dtype == np.float32
