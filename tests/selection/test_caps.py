"""Frequency caps: both stores, same contract; concurrency against a real SQLite file and a real redis-server."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selection.caps import (
    CapConfig,
    CapStore,
    CapStoreError,
    RedisCapStore,
    SQLiteCapStore,
    open_cap_store,
)
from kernel.settings import Settings
from agent.local_server import free_port
from tests.utils.redis_server import RedisProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = CapConfig(max_per_ad=3, max_per_advertiser=5, window_s=60.0)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for this module only (tests/utils/redis_server.py)."""
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[CapConfig], CapStore]]:
    """A factory of empty stores of each kind; all are closed after the test."""
    made: list[CapStore] = []

    def make(config: CapConfig = CONFIG) -> CapStore:
        if request.param == "sqlite":
            store: CapStore = SQLiteCapStore(tmp_path / f"caps{len(made)}.sqlite", config=config)
        else:
            import redis

            url = request.getfixturevalue("redis_url")
            store = RedisCapStore(redis.Redis.from_url(url), config=config, prefix=f"test:{request.node.name}:{len(made)}")
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_per_ad_cap(make_store):
    store = make_store(CONFIG)
    results = [store.try_reserve("u1", "ad1", "acme", now=1000.0 + i) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert store.count("u1", ad_id="ad1", now=1010.0) == 3
    assert store.count("u1", advertiser="acme", now=1010.0) == 3
    assert store.try_reserve("u2", "ad1", "acme", now=1010.0), "caps are per user"


def test_per_advertiser_cap_spans_ads(make_store):
    store = make_store(CONFIG)
    results = [store.try_reserve("u1", f"ad{i}", "acme", now=1000.0) for i in range(7)]
    assert results == [True] * 5 + [False] * 2
    assert store.try_reserve("u1", "other-ad", "other-advertiser", now=1000.0)
    assert store.count("u1", advertiser="acme", now=1000.0) == 5


def test_refused_reservation_records_nothing(make_store):
    store = make_store(CapConfig(max_per_ad=10, max_per_advertiser=2, window_s=60.0))
    assert store.try_reserve("u1", "ad1", "acme", now=1000.0)
    assert store.try_reserve("u1", "ad1", "acme", now=1000.0)
    assert not store.try_reserve("u1", "ad1", "acme", now=1000.0)  # advertiser cap hit
    assert store.count("u1", ad_id="ad1", now=1000.0) == 2


def test_window_slides(make_store):
    store = make_store(CapConfig(max_per_ad=2, max_per_advertiser=None, window_s=60.0))
    assert store.try_reserve("u1", "ad1", "acme", now=1000.0)
    assert store.try_reserve("u1", "ad1", "acme", now=1030.0)
    assert not store.try_reserve("u1", "ad1", "acme", now=1059.0)
    assert store.try_reserve("u1", "ad1", "acme", now=1060.0), "the t=1000 impression expires at exactly t+window"
    assert not store.try_reserve("u1", "ad1", "acme", now=1061.0)
    assert store.count("u1", ad_id="ad1", now=1200.0) == 0


def test_empty_advertiser_only_checks_ad_cap(make_store):
    store = make_store(CapConfig(max_per_ad=10, max_per_advertiser=1, window_s=60.0))
    assert all(store.try_reserve("u1", f"ad{i}", "", now=1000.0) for i in range(4))


def test_no_caps_configured(make_store):
    store = make_store(CapConfig(max_per_ad=None, max_per_advertiser=None, window_s=60.0))
    assert all(store.try_reserve("u1", "ad1", "acme", now=1000.0) for _ in range(20))
    assert store.count("u1", ad_id="ad1", now=1000.0) == 20


def test_release_gives_back_exactly_one_reservation(make_store):
    store = make_store(CONFIG)
    a = store.reserve("u1", "ad1", "acme", now=1000.0)
    b = store.reserve("u1", "ad1", "acme", now=1001.0)
    assert a is not None and b is not None and a != b
    store.release(a)
    store.release(a)  # twice is harmless
    assert store.count("u1", ad_id="ad1", now=1002.0) == 1
    assert store.count("u1", advertiser="acme", now=1002.0) == 1
    assert store.reserve("u1", "ad1", "acme", now=1003.0) is not None  # the freed slot is usable again


def test_redis_from_settings_does_not_retry(tmp_path: Path):
    """A dead Redis fails the call once (no retries with backoff), then is skipped until the retry period."""
    store = open_cap_store(Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert store.client.get_retry().get_retries() == 0
    assert store.client.connection_pool.connection_kwargs["socket_timeout"] == Settings(_env_file=None).redis_timeout_s
    for _ in range(2):
        with pytest.raises(CapStoreError):
            store.try_reserve("u1", "ad1", "acme")
    store.close()


def test_count_needs_exactly_one_key(make_store):
    store = make_store(CONFIG)
    with pytest.raises(ValueError):
        store.count("u1", now=1000.0)
    with pytest.raises(ValueError):
        store.count("u1", ad_id="a", advertiser="b", now=1000.0)


def test_default_now_is_wall_clock(make_store):
    store = make_store(CONFIG)
    assert store.try_reserve("u1", "ad1", "acme")
    assert store.count("u1", ad_id="ad1") == 1


@pytest.mark.parametrize("n_ads", [1, 10])
def test_50_threads_never_exceed_caps(make_store, n_ads: int):
    store = make_store(CONFIG)
    barrier = threading.Barrier(50)

    def reserve(i: int) -> tuple[str, bool]:
        ad_id = f"ad{i % n_ads}"
        barrier.wait()
        return ad_id, store.try_reserve("u1", ad_id, "acme", now=1000.0)

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(reserve, range(50)))

    granted = [ad for ad, ok in results if ok]
    expected = CONFIG.max_per_ad if n_ads == 1 else CONFIG.max_per_advertiser
    assert len(granted) == expected
    assert all(granted.count(ad) <= CONFIG.max_per_ad for ad in set(granted))
    assert store.count("u1", advertiser="acme", now=1000.0) == expected


_WORKER = textwrap.dedent(
    """
    import sys
    from selection.caps import CapConfig, SQLiteCapStore
    path, n = sys.argv[1], int(sys.argv[2])
    store = SQLiteCapStore(path, config=CapConfig(max_per_ad=7, max_per_advertiser=None, window_s=60.0))
    sys.stdin.readline()  # start together
    print(sum(store.try_reserve("u1", "ad1", "acme", now=1000.0) for _ in range(n)))
    """
)


def test_sqlite_cap_holds_across_processes(tmp_path: Path):
    path = tmp_path / "caps.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), "10"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        for _ in range(4)
    ]
    time.sleep(0.5)  # let every worker open the database
    outs = [p.communicate("go\n", timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(o) for o in outs) == 7


def test_sqlite_prune_removes_only_expired(tmp_path: Path):
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=CONFIG)
    store.try_reserve("u1", "ad1", "acme", now=1000.0)
    store.try_reserve("u2", "ad1", "acme", now=1050.0)
    assert store.prune(now=1070.0) == 1
    assert store.count("u2", ad_id="ad1", now=1070.0) == 1
    store.close()


def test_sqlite_failure_is_typed(tmp_path: Path):
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=CONFIG)
    store._connection().execute("DROP TABLE impressions")
    with pytest.raises(CapStoreError):
        store.try_reserve("u1", "ad1", "acme", now=1000.0)
    store.close()


def test_redis_failure_is_typed():
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    store = RedisCapStore(client, config=CONFIG)
    with pytest.raises(CapStoreError):
        store.try_reserve("u1", "ad1", "acme", now=1000.0)


def test_redis_keys_expire_after_window(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    store = RedisCapStore(client, config=CapConfig(max_per_ad=3, max_per_advertiser=5, window_s=60.0), prefix="ttl")
    store.try_reserve("u1", "ad1", "acme", now=time.time())
    keys = sorted(k.decode() for k in client.keys("ttl:*"))
    assert keys == ["ttl:{u1}:ad:ad1", "ttl:{u1}:adv:acme"]
    assert all(0 < client.pttl(k) <= 60_000 for k in keys)
    client.close()


def test_open_cap_store_from_settings(tmp_path: Path, redis_url: str):
    sqlite_store = open_cap_store(Settings(_env_file=None, data_dir=tmp_path, cap_max_per_ad=0))
    assert isinstance(sqlite_store, SQLiteCapStore) and sqlite_store.config.max_per_ad is None
    assert (tmp_path / "caps.sqlite").exists()
    sqlite_store.close()
    redis_store = open_cap_store(Settings(_env_file=None, redis_url=redis_url))
    assert isinstance(redis_store, RedisCapStore)
    assert redis_store.try_reserve("settings-user", "ad1", "acme")
    redis_store.close()
