"""Exact and approximate inner-product indexes (gca_pyg.vector_index)."""

import faiss
import numpy as np
import pytest

from gca_pyg.errors import ConfigError
from gca_pyg.vector_index import (
    EF_SEARCH_LADDER,
    EXACT_LIMIT,
    append_rows,
    build_index,
    choose_kind,
    exact_search,
    recall_at_k,
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
    with pytest.raises(ConfigError, match="unknown index kind 'annoy'.*flat, ivf, hnsw"):
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
        assert settings.recall >= 0.95 and settings.recall_k == 10
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
