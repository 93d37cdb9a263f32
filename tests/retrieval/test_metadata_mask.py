"""Chroma `where` filters evaluated in memory select exactly the ads Chroma selects, and the exact
in-memory search returns the same neighbours as Chroma whenever Chroma's answer is complete."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retrieval.features import build_profile
from selection.services import make_store


def _filters(index) -> list[dict]:
    ads = index.ads
    cats = sorted({a.category for a in ads})
    advs = sorted({a.advertiser for a in ads})
    bids = sorted({a.bid for a in ads})
    mid = bids[len(bids) // 2]
    return [
        {"bid": {"$gte": mid}},
        {"bid": {"$lt": mid}},
        {"category": {"$nin": cats[:2]}},
        {"category": {"$in": cats[:1] + ["no such category"]}},
        {"advertiser": {"$ne": advs[0]}},
        {"advertiser": advs[1]},
        {"$and": [{"bid": {"$gte": mid}}, {"category": {"$nin": cats[:1]}}, {"subcategory": {"$nin": cats[:1]}}]},
        {"$or": [{"advertiser": {"$eq": advs[0]}}, {"bid": {"$gt": mid}}]},
        {"category": {"$nin": ["nothing", "matches"]}},
    ]


def test_mask_selects_what_chroma_selects(demo_settings):
    store = make_store(demo_settings)
    index = store.load_index()
    for where in _filters(index):
        chroma_ids = set(store.collection.get(where=where, include=[])["ids"])
        mask = index.columns.mask(where)
        assert mask is not None, where
        assert set(index.id_array[mask].tolist()) == chroma_ids, where


def test_unsupported_filter_answers_none(demo_settings):
    index = make_store(demo_settings).load_index()
    assert index.columns.mask({"title": {"$eq": "x"}}) is None
    assert index.columns.mask({"bid": {"$gte": "1"}}) is None
    assert index.columns.mask({"$and": []}) is None


@pytest.mark.parametrize("exact", [True, False])
def test_exact_search_returns_chromas_neighbours(demo_services, exact):
    gen = dataclasses.replace(demo_services.selector.generator, exact_max_ads=len(demo_services.index) if exact else 0)
    index = gen.index
    store = gen.store
    rng = np.random.default_rng(0)
    for where in [None, *_filters(index)]:
        for _ in range(3):
            profile = build_profile(index, rng.integers(0, len(index), 5).tolist(), decay=0.8)
            n_match = int(index.columns.mask(where).sum())
            got = gen._dense(profile, n_match, where)  # every matching ad: Chroma's answer is complete too
            want = [index.row[i] for i, _ in store.nearest(profile.vector, n_match, where=where)] if n_match else []
            assert set(got) == set(want), where
            sims = index.vectors[got] @ profile.vector
            assert np.all(np.diff(sims) <= 1e-6)  # best first
