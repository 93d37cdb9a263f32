"""One round trip per request: reserve_many (one SQLite transaction, one Redis script call) gives the
verdicts reserve() one by one would give, holds the caps under parallel calls, and is what the pipeline uses."""
from __future__ import annotations

import asyncio
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from kernel.types import SelectRequest
from selection.caps import CapConfig, SQLiteCapStore, reserve_in_order
from tests.selection.test_caps import make_store, redis_url  # noqa: F401 - fixtures

CONFIG = CapConfig(max_per_ad=2, max_per_advertiser=3, window_s=100.0)
ADS = [("a1", "x"), ("a2", "x"), ("a3", "y"), ("a4", ""), ("a5", "y"), ("a6", "x")]


def _one_by_one(store, user: str, items, *, limit: int, now: float) -> list[bool]:
    out: list[bool] = []
    for ad, adv in items:
        if sum(out) >= limit:
            break
        out.append(store.reserve(user, ad, adv, now=now) is not None)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_same_verdicts_as_reserve_one_by_one(make_store, seed: int):
    rng = random.Random(seed)
    batch, single = make_store(CONFIG), make_store(CONFIG)
    for step in range(12):
        items = [rng.choice(ADS) for _ in range(rng.randint(0, 6))]
        limit = rng.randint(1, 4)
        now = 1000.0 + step * 15  # the window slides over the run
        got = [r is not None for r in batch.reserve_many("u", items, limit=limit, now=now)]
        assert got == _one_by_one(single, "u", items, limit=limit, now=now), (step, items, limit)
    for ad, adv in ADS:
        assert batch.count("u", ad_id=ad, now=now) == single.count("u", ad_id=ad, now=now)
        if adv:
            assert batch.count("u", advertiser=adv, now=now) == single.count("u", advertiser=adv, now=now)


def test_parallel_batches_never_exceed_caps(make_store):
    store = make_store(CONFIG)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: store.reserve_many("u", ADS, limit=3, now=1000.0), range(40)))
    served = [r for rs in results for r in rs if r is not None]
    per_ad = {ad: sum(r.ad_id == ad for r in served) for ad, _ in ADS}
    per_adv = {adv: sum(r.advertiser == adv for r in served) for adv in ("x", "y")}
    assert max(per_ad.values()) <= CONFIG.max_per_ad and max(per_adv.values()) <= CONFIG.max_per_advertiser
    assert per_ad["a4"] == 2  # no advertiser: only its own cap binds
    assert all(store.count("u", ad_id=ad, now=1000.0) == n for ad, n in per_ad.items())


def test_released_batch_reservations_are_given_back(make_store):
    store = make_store(CONFIG)
    reserved: list = []
    got, error = reserve_in_order(store, "u", ADS, limit=2, reserved=reserved, now=1000.0)
    assert error is None and len(reserved) == 2 and [r.ad_id for r in reserved] == ["a1", "a2"]
    for r in reserved:
        store.release(r)
    assert store.count("u", advertiser="x", now=1000.0) == 0


def _sqlite_transactions(store: SQLiteCapStore) -> list[str]:
    seen: list[str] = []
    store._connection().set_trace_callback(lambda sql: seen.append(sql) if sql.startswith("BEGIN") else None)
    return seen


def test_sqlite_batch_is_one_transaction(tmp_path: Path):
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=CONFIG)
    begins = _sqlite_transactions(store)
    store.reserve_many("u", ADS, limit=5, now=1000.0)
    assert begins == ["BEGIN IMMEDIATE"]


def test_redis_batch_is_one_script_call(redis_url):  # noqa: F811
    import redis

    from selection.caps import RedisCapStore

    client = redis.Redis.from_url(redis_url)
    store = RedisCapStore(client, config=CONFIG, prefix=f"test:{uuid.uuid4().hex}")
    store.reserve_many("u", [], limit=1, now=1000.0)  # loads the script
    before = client.info("commandstats")
    assert [r is not None for r in store.reserve_many("u", ADS, limit=5, now=1000.0)] == [True, True, True, True, True]
    after = client.info("commandstats")
    calls = {k: after[k]["calls"] - before.get(k, {}).get("calls", 0) for k in after if k != "cmdstat_info"}
    inside_script = {"cmdstat_zadd", "cmdstat_zcard", "cmdstat_zremrangebyscore", "cmdstat_pexpire"}  # counted too
    assert {k: v for k, v in calls.items() if v and k not in inside_script} == {"cmdstat_evalsha": 1}


def test_pipeline_reserves_a_response_in_one_transaction(demo_services, tmp_path: Path):
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=CapConfig(max_per_ad=3, max_per_advertiser=10, window_s=3600))
    sel = replace(demo_services.selector, caps=store)
    begins = _sqlite_transactions(store)
    d = asyncio.run(sel.aselect(SelectRequest(user_id="one", history=["run-001", "run-004"], k=5, use_llm=False)))
    assert len(d.ads) == 5 and begins == ["BEGIN IMMEDIATE"]
    key = sel.user_key("one")
    assert [store.count(key, ad_id=a.ad.ad_id) for a in d.ads] == [1] * 5


@pytest.mark.parametrize("scan_rows_per_item", [2, 0])  # 0: the user has "too many" rows: the indexed counts
def test_sqlite_batch_is_one_count_read_and_one_insert(tmp_path: Path, scan_rows_per_item: int):
    """The statements of one reserve_many (SQLite's own trace): the counts of all items' ads and advertisers come
    from one scan of the user's rows in the window (two indexed queries when the user has more rows than the
    scan bound), not two per item, and every reservation from one INSERT; the verdicts are those of reserve()
    one by one."""
    store, single = SQLiteCapStore(tmp_path / "caps.sqlite", config=CONFIG), SQLiteCapStore(tmp_path / "single.sqlite", config=CONFIG)
    store.SCAN_ROWS_PER_ITEM = scan_rows_per_item
    items = [(f"ad{i}", "xy"[i % 2]) for i in range(20)]
    store.reserve_many("u", items[:4], limit=4, now=1000.0)
    _one_by_one(single, "u", items[:4], limit=4, now=1000.0)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    got = store.reserve_many("u", items, limit=5, now=1010.0)
    store._connection().set_trace_callback(None)
    assert [r is not None for r in got] == _one_by_one(single, "u", items, limit=5, now=1010.0)
    selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    inserts = [q for q in statements if q.lstrip().upper().startswith("INSERT")]
    assert len(selects) == (1 if scan_rows_per_item else 3) and len(inserts) == 1
    for r in got:  # each token names its own row: releasing it gives back that ad's impression
        if r is not None:
            before = store.count("u", ad_id=r.ad_id, now=1010.0)
            store.release(r)
            assert store.count("u", ad_id=r.ad_id, now=1010.0) == before - 1


@pytest.mark.parametrize("scan_rows_per_item", [2, 0])
def test_sqlite_batch_same_verdicts_on_both_count_paths(tmp_path: Path, scan_rows_per_item: int):
    rng = random.Random(scan_rows_per_item)
    batch, single = SQLiteCapStore(tmp_path / "b.sqlite", config=CONFIG), SQLiteCapStore(tmp_path / "s.sqlite", config=CONFIG)
    batch.SCAN_ROWS_PER_ITEM = scan_rows_per_item
    for step in range(12):
        items = [rng.choice(ADS) for _ in range(rng.randint(1, 6))]
        limit = rng.randint(1, 4)
        now = 1000.0 + step * 15
        got = [r is not None for r in batch.reserve_many("u", items, limit=limit, now=now)]
        assert got == _one_by_one(single, "u", items, limit=limit, now=now), (step, items, limit)


def test_sqlite_batch_without_returning_inserts_row_by_row_with_the_same_verdicts(tmp_path: Path):
    """SQLite before 3.35 has no INSERT ... RETURNING: the store then inserts one row per reservation."""
    rng = random.Random(7)
    batch, single = SQLiteCapStore(tmp_path / "b.sqlite", config=CONFIG), SQLiteCapStore(tmp_path / "s.sqlite", config=CONFIG)
    batch.returning = False
    statements: list[str] = []
    batch._connection().set_trace_callback(statements.append)
    for step in range(12):
        items = [rng.choice(ADS) for _ in range(rng.randint(1, 6))]
        limit = rng.randint(1, 4)
        now = 1000.0 + step * 15
        got = batch.reserve_many("u", items, limit=limit, now=now)
        assert [r is not None for r in got] == _one_by_one(single, "u", items, limit=limit, now=now), (step, items, limit)
    assert not any("RETURNING" in q.upper() for q in statements)
    r = next(r for r in got if r is not None)
    before = batch.count("u", ad_id=r.ad_id, now=now)
    batch.release(r)
    assert batch.count("u", ad_id=r.ad_id, now=now) == before - 1


def test_sqlite_batch_counts_rendered_mode_like_reserve(tmp_path: Path):
    """cap_count=rendered: a batch reservation is pending (it lapses after the grace time unless rendered), as
    reserve() makes it; the pipeline reserves through reserve_many."""
    cfg = CapConfig(max_per_ad=1, max_per_advertiser=None, window_s=3600, count_rendered=True, render_grace_s=10)
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=cfg)
    assert [r is not None for r in store.reserve_many("u", [("ad", "adv")], limit=1, now=T0)] == [True]
    assert [r is not None for r in store.reserve_many("u", [("ad", "adv")], limit=1, now=T0 + 5)] == [False]  # pending, in grace
    assert store.count("u", ad_id="ad", now=T0 + 11) == 0  # never rendered: lapsed
    assert [r is not None for r in store.reserve_many("u", [("ad", "adv")], limit=1, now=T0 + 11)] == [True]
    store.confirm_render(user_key="u", ad_id="ad", advertiser="adv", reservation_id="", reserved_at=T0 + 11)
    assert [r is not None for r in store.reserve_many("u", [("ad", "adv")], limit=1, now=T0 + 100)] == [False]  # rendered: counted


T0 = 1_000_000.0
