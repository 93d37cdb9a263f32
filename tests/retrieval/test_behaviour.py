"""Behaviour priors: learned from histories only, co-visitation direction and recency weighting, persistence."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.behaviour import BehaviourStats
from retrieval.ingest import learn_behaviour

IDS = ["a", "b", "c", "d", "e", "x"]


def rc(stats: BehaviourStats, matrix: str, i: str, j: str) -> float:
    row = {a: k for k, a in enumerate(stats.ids)}
    return float(getattr(stats, matrix)[row[i], row[j]])


def test_clicked_ads_never_feed_the_priors(tmp_path: Path):
    """`x` is clicked in every impression but appears in no history: zero popularity, no co-visits."""
    imps = [
        {"impression_id": "i1", "user_id": "u1", "history": ["a", "b"], "candidates": ["x", "c"], "clicked": ["x"]},
        {"impression_id": "i2", "user_id": "u2", "history": ["b", "c"], "candidates": [], "clicked": ["x"]},
        {"impression_id": "i3", "user_id": "u3", "history": ["c", "d", "a"], "clicked": ["x", "e"]},
    ]
    path = tmp_path / "imps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in imps))
    stats = learn_behaviour(history_paths=[path], catalog_ids=IDS, out_dir=tmp_path / "beh", window=3, decay=0.8, cf_dims=2)

    x, e = IDS.index("x"), IDS.index("e")
    assert stats.popularity[x] == 0 and stats.popularity[e] == 0
    assert stats.forward[x].nnz == 0 and stats.forward[:, x].nnz == 0
    assert stats.symmetric[x].nnz == 0
    assert stats.cf is None or not stats.cf[x].any()
    assert stats.popularity[IDS.index("a")] == 2  # seen in two histories
    assert stats.n_histories == 3
    assert x not in stats.top_popular(10).tolist()


def test_covisitation_direction_and_recency_weighting():
    stats = BehaviourStats.learn([["a", "b", "c", "d"]], IDS, window=2, decay=0.5, cf_dims=2)
    # forward: i then j, weighted decay ** (gap - 1); nothing beyond the window; never backwards.
    assert rc(stats, "forward", "a", "b") == pytest.approx(1.0)
    assert rc(stats, "forward", "a", "c") == pytest.approx(0.5)
    assert rc(stats, "forward", "a", "d") == 0.0  # gap 3 > window 2
    assert rc(stats, "forward", "b", "a") == 0.0
    assert rc(stats, "forward", "d", "c") == 0.0
    # symmetric: either order.
    assert rc(stats, "symmetric", "b", "a") == pytest.approx(1.0)
    assert rc(stats, "symmetric", "c", "a") == pytest.approx(0.5)
    assert rc(stats, "symmetric", "a", "c") == rc(stats, "symmetric", "c", "a")


def test_counts_add_up_across_histories_and_repeats_count_once():
    stats = BehaviourStats.learn(
        [["a", "b"], ["a", "b"], ["c", "a", "b"], ["b", "a"], ["a", "a", "b", "zz-unknown"]], IDS, window=3, decay=0.5
    )
    # ["a","b"] twice counts once (same user, repeated impressions); ["a","a","b"] skips the self-pair.
    # a->b: [a,b] 1 + [c,a,b] 1 + [a,a,b] (gap 1: 1, gap 2: 0.5) = 3.5; b->a: [b,a] 1.
    assert rc(stats, "forward", "a", "b") == pytest.approx(3.5)
    assert rc(stats, "forward", "b", "a") == pytest.approx(1.0)
    assert rc(stats, "forward", "a", "a") == 0.0
    assert stats.n_histories == 4
    assert stats.popularity[IDS.index("a")] == 4  # once per distinct history, however often it repeats


def test_save_load_and_aligned_to_round_trip(tmp_path: Path):
    hists = [["a", "b", "c"], ["b", "c", "d"], ["a", "c", "e"], ["d", "e", "a"], ["c", "b"]]
    stats = BehaviourStats.learn(hists, IDS, window=3, decay=0.8, cf_dims=3)
    assert stats.cf is not None
    stats.save(tmp_path)

    same = BehaviourStats.load(tmp_path, IDS)
    assert same.ids == IDS and (same.n_histories, same.window, same.decay) == (5, 3, 0.8)
    np.testing.assert_array_equal(same.popularity, stats.popularity)
    np.testing.assert_array_equal(same.forward.toarray(), stats.forward.toarray())
    np.testing.assert_array_equal(same.symmetric.toarray(), stats.symmetric.toarray())
    np.testing.assert_array_equal(same.cf, stats.cf)

    # A re-ingest reordered the catalog, dropped `e` and added `new`: every table follows the ids.
    new_ids = ["new", "d", "c", "b", "a", "x"]
    moved = BehaviourStats.load(tmp_path, new_ids)
    assert moved.ids == new_ids
    for i in new_ids:
        for j in new_ids:
            want = rc(stats, "forward", i, j) if "new" not in (i, j) else 0.0
            assert rc(moved, "forward", i, j) == pytest.approx(want), (i, j)
    for k, a in enumerate(new_ids):
        old = IDS.index(a) if a in IDS else None
        assert moved.popularity[k] == (stats.popularity[old] if old is not None else 0)
        np.testing.assert_array_equal(moved.cf[k], stats.cf[old] if old is not None else 0)
    np.testing.assert_array_equal(moved.symmetric.toarray(), (moved.forward + moved.forward.T).toarray())

    back = moved.aligned_to(IDS)
    e = IDS.index("e")
    mask = np.ones(len(IDS), dtype=bool)
    mask[e] = False  # `e` was dropped on the way: its row and column are gone for good
    np.testing.assert_array_equal(back.forward.toarray()[np.ix_(mask, mask)], stats.forward.toarray()[np.ix_(mask, mask)])
    assert back.popularity[e] == 0 and not back.forward[e].nnz


def test_load_without_tables_is_none(tmp_path: Path):
    assert BehaviourStats.load(tmp_path / "missing", IDS) is None
