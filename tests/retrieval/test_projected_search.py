"""The two-stage projected search returns the full scan's top k: the same rows with the same scores, best
first, ties by row, on the real MiniLM vectors of the demo catalog (duplicated, so exact ties exist) and real
user profiles; and the candidate generator's dense source is that search when the catalog is large enough."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from retrieval.features import build_profile
from retrieval.projected_search import ProjectedSearch
from retrieval.similarity import row_dots, row_dots_by_row

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "impressions.jsonl"


def _profiles(index, n: int) -> list:
    out = []
    with DEMO.open(encoding="utf-8") as fh:
        for line in fh:
            rows, _ = index.rows(json.loads(line).get("history") or [])
            if rows:
                out.append(build_profile(index, rows, decay=0.8))
            if len(out) == n:
                break
    return out


def _full_scan(vectors: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = row_dots_by_row(vectors, q)  # the search's own exact scores, over every row
    order = np.lexsort((np.arange(len(s)), -s))[:k]
    return order, s


def test_projected_top_equals_the_full_scan(demo_services):
    index = demo_services.index
    vectors = np.concatenate([index.vectors, index.vectors[::3]])  # duplicated rows: exact ties
    for dims, shortlist in ((8, 20), (32, 40), (384, 10)):
        search = ProjectedSearch(vectors, dims=dims, shortlist=shortlist)
        for prof in _profiles(index, 15):
            for k in (1, 10, 50):
                rows = search.top(prof.vector, k)
                want, s = _full_scan(vectors, prof.vector, k)
                assert len(rows) == len(want) == len(set(rows.tolist()))
                np.testing.assert_allclose(s[rows], s[want], rtol=0, atol=1e-6)  # the same scores, best first
                assert np.array_equal(rows, want)  # and the same rows, ties by row


def test_projected_top_k_larger_than_the_catalog(demo_services):
    vectors = demo_services.index.vectors
    rows = ProjectedSearch(vectors, dims=4, shortlist=3).top(vectors[0], len(vectors) + 5)
    assert sorted(rows.tolist()) == list(range(len(vectors)))


def test_generator_dense_source_is_the_projected_search(demo_services):
    gen = dataclasses.replace(demo_services.selector.generator, use_chroma=False, projected_min_ads=0)
    fast = dataclasses.replace(gen, projected_min_ads=1)
    assert gen.projected() is None and fast.projected() is not None
    for prof in _profiles(gen.index, 10):
        want = gen._dense(prof, 40, None)
        got = fast._dense(prof, 40, None)
        s = row_dots(gen.index.vectors, prof.vector)
        np.testing.assert_allclose(s[got], s[want], rtol=0, atol=1e-6)
        assert got == fast.projected().top(prof.vector, 40).tolist()


def test_a_replaced_generator_keeps_the_built_search(demo_services):
    """A reload replaces the generator (new behaviour tables, the same index): the search is not rebuilt; a new
    index is searched by a search of its own."""
    fast = dataclasses.replace(demo_services.selector.generator, use_chroma=False, projected_min_ads=1)
    built = fast.projected()
    assert dataclasses.replace(fast, n_dense=5).projected() is built
    other = dataclasses.replace(fast.index, vectors=fast.index.vectors.copy())
    assert dataclasses.replace(fast, index=other).projected() is not built
