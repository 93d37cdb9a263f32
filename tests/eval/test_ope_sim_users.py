"""The simulation's full-dev users (eval.ope_sim.sampled_users): distinct users, each with the sampled
protocol's list (the next purchase + 19 distinct catalog ads not in the history), the same for the same seed."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from eval.ope_sim import sampled_users
from retrieval.records import read_ads

GAMES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "amazon_games_6k"
if not GAMES.exists():  # the worktree layout (/work/wt/NAME) vs a clone beside shared/
    GAMES = Path("/work/shared/data/amazon_games_6k")


def _rows(n: int = 400) -> list[dict]:
    with (GAMES / "impressions_full_dev.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in itertools.islice(fh, n)]


CATALOG = [a.ad_id for a in read_ads(GAMES / "ads.jsonl")]


def test_each_list_is_the_next_purchase_plus_19_distinct_catalog_ads_outside_the_history() -> None:
    rows = _rows()
    users = sampled_users(rows, catalog=CATALOG, n=300, seed=0)
    assert len(users) == 300 and len({u.user_id for u in users}) == 300
    known = set(CATALOG)
    by_id = {r["user_id"]: r for r in rows}
    for u in users:
        assert u.next_purchase == by_id[u.user_id]["clicked"][0] and u.history == by_id[u.user_id]["history"]
        assert len(u.candidates) == 20 and len(set(u.candidates)) == 20 and u.next_purchase in u.candidates
        negatives = [c for c in u.candidates if c != u.next_purchase]
        assert len(negatives) == 19 and not set(negatives) & set(u.history) and set(negatives) <= known
    assert len({u.candidates.index(u.next_purchase) for u in users}) > 10  # shuffled, not always first


def test_a_users_list_is_seeded_by_the_candidate_seed_and_the_user_not_the_order() -> None:
    rows = _rows()
    a = {u.user_id: u.candidates for u in sampled_users(rows, catalog=CATALOG, n=100, seed=0)}
    again = {u.user_id: u.candidates for u in sampled_users(rows, catalog=CATALOG, n=100, seed=0)}
    reordered = {u.user_id: u.candidates for u in sampled_users(list(reversed(rows)), catalog=CATALOG, n=len(rows), seed=7)}
    other = {u.user_id: u.candidates for u in sampled_users(rows, catalog=CATALOG, n=100, seed=0, candidate_seed=1)}
    assert a == again
    assert all(reordered[uid] == cands for uid, cands in a.items())
    assert sum(other[uid] != cands for uid, cands in a.items()) > 90


def test_the_preferred_users_come_first_and_slices_are_disjoint() -> None:
    rows = _rows()
    first = {r["user_id"] for r in rows[::4]}
    head = sampled_users(rows, catalog=CATALOG, n=len(first), seed=3, first=first)
    assert {u.user_id for u in head} == first
    rest = sampled_users(rows, catalog=CATALOG, n=50, seed=3, first=first, offset=len(first))
    assert not {u.user_id for u in rest} & first
    assert len({u.request_id for u in head + rest}) == len(head) + len(rest)
