"""The copy cache shared through a real redis-server: one worker's rewrite is served by another without an LLM call,
workers that miss the same key at once make one call between them, and a dead Redis only costs misses."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agent.copy_cache import BackgroundCopier, CopyCache, CopyRewriter, Rejected
from agent.copy_store import SharedCopyCache, decode, encode, redis_key
from agent.llm import ChatLLM
from kernel.settings import Settings
from kernel.types import Copy
from selection.redis_client import redis_from_settings
from tests.agent.test_copy_cache import AD, PROMPT, SETTINGS, lengths_only
from tests.utils.counting import CountingLLM
from tests.utils.fakes import FakeQueueLLM
from tests.utils.redis_server import RedisProcess

GOOD = json.dumps({"headline": "Tempo Glide daily trainer", "description": "A soft landing and a fast toe-off."})


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis") as proc:
        yield proc


def client_for(url: str):
    return redis_from_settings(Settings(_env_file=None, redis_url=url, redis_timeout_s=0.5))


def shared(url: str, *, ttl_s: float = 60.0) -> SharedCopyCache:
    return SharedCopyCache(client_for(url), local=CopyCache(max_entries=100), ttl_s=ttl_s, claim_s=30.0)


def test_entries_round_trip_and_a_foreign_value_is_refused() -> None:
    for item in (Copy(headline="Tempo Glide", description="Soft landing."), Rejected(("too_long", "brand"))):
        assert decode(encode(item)) == item
    for raw in ("[1]", '{"headline": 3}', "not json"):
        with pytest.raises(ValueError):
            decode(raw)


def test_one_workers_rewrite_is_served_by_another_worker_without_a_call(server: RedisProcess, local_llm_url: str) -> None:
    """Two copiers (two serving processes' worth) over one real Redis and the real LLM server; both miss the
    same key at once: one LLM call between them, and then both serve the rewrite."""
    calls = [CountingLLM(ChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, max_tokens=SETTINGS.copy_max_tokens, timeout_s=600))
             for _ in range(2)]  # fmt: skip
    caches = [shared(server.url) for _ in range(2)]

    async def run():
        copiers = [BackgroundCopier(rewriter=CopyRewriter(c, PROMPT, timeout_s=600), validate=lengths_only, cache=cache)
                   for c, cache in zip(calls, caches)]  # fmt: skip
        for c in copiers:
            await c.start()
        try:
            misses = [c.lookup(AD, "running shoes") for c in copiers]
            for c in copiers:
                await c.drain()
            hits = [c.lookup(AD, "running shoes") for c in copiers]
            return misses, hits, [c.snapshot() for c in copiers]
        finally:
            for c in copiers:
                await c.aclose()

    misses, hits, snaps = asyncio.run(run())
    assert misses == [None, None]
    assert sum(c.calls for c in calls) == 1, snaps  # one rewrite for the two processes
    assert sorted(s["generated"] for s in snaps) == [0, 1] and sorted(s["shared_deduped"] for s in snaps) == [0, 1]
    assert isinstance(hits[0], Copy) and hits[0] == hits[1]  # the one that did not generate it reads it from Redis
    assert all(s["store_errors"] == {} for s in snaps)
    key = CopyRewriter(calls[0], PROMPT).key(AD, "running shoes")
    raw = redis.Redis.from_url(server.url)
    assert decode(raw.get(redis_key(key))) == hits[0] and 0 < raw.pttl(redis_key(key)) <= 60_000


def test_a_rejection_is_shared_and_a_failed_rewrite_gives_its_claim_back(server: RedisProcess) -> None:
    """FakeQueueLLM: a rejected answer and an LLM failure on demand (what a real server cannot be made to do)."""
    from kernel.errors import LLMUnavailable

    async def run():
        bad = json.dumps({"headline": "x" * 29 + " and much more than the display takes", "description": "d"})
        first = BackgroundCopier(rewriter=CopyRewriter(FakeQueueLLM().enqueue(bad), PROMPT), validate=lengths_only, cache=shared(server.url))
        async with first:
            first.lookup(AD, "running shoes")
            await first.drain()
        other = BackgroundCopier(rewriter=CopyRewriter(FakeQueueLLM(), PROMPT), validate=lengths_only, cache=shared(server.url))
        async with other:
            rejected = other.lookup(AD, "running shoes")  # read from Redis: a rejection, never served, nothing queued
            snap_other = other.snapshot()
        failing = FakeQueueLLM().enqueue(LLMUnavailable("timeout", "test"), GOOD)
        retry = BackgroundCopier(rewriter=CopyRewriter(failing, PROMPT), validate=lengths_only, cache=shared(server.url))
        async with retry:
            retry.lookup(AD, "trail")
            await retry.drain()  # failed: its claim is given back ...
            retry.lookup(AD, "trail")
            await retry.drain()  # ... so the next miss (here the same process) may generate it
            served = retry.lookup(AD, "trail")
            snap_retry = retry.snapshot()
        return first.snapshot(), rejected, snap_other, served, snap_retry

    snap_first, rejected, snap_other, served, snap_retry = asyncio.run(run())
    assert snap_first["rejected"] == 1
    assert rejected is None and snap_other["rejected_hits"] == 1 and snap_other["enqueued"] == 0
    assert snap_retry["failed"] == {"timeout": 1} and snap_retry["generated"] == 1 and served is not None
    assert served.headline == "Tempo Glide daily trainer"


def test_a_dead_redis_costs_misses_and_counted_errors_never_a_failure(server: RedisProcess) -> None:
    cache = shared(server.url)
    llm = FakeQueueLLM().enqueue(GOOD)
    server.kill()

    async def run():
        async with BackgroundCopier(rewriter=CopyRewriter(llm, PROMPT), validate=lengths_only, cache=cache) as copier:
            miss = copier.lookup(AD, "running shoes")
            await copier.drain()  # claim and put fail: generated and kept in this process
            hit = copier.lookup(AD, "running shoes")
            return miss, hit, copier.snapshot()

    miss, hit, snap = asyncio.run(run())
    assert miss is None and hit is not None and hit.headline == "Tempo Glide daily trainer"
    assert snap["generated"] == 1 and len(llm.calls) == 1
    assert snap["store_errors"].get("get", 0) >= 1 and snap["store_errors"]["claim"] == 1 and snap["store_errors"]["put"] == 1


def test_from_settings_shares_the_cache_when_given_a_redis_client(server: RedisProcess) -> None:
    s = Settings(_env_file=None, redis_url=server.url, copy_cache_entries=7, copy_cache_ttl_s=30.0, copy_timeout_s=5.0)
    rewriter = CopyRewriter(FakeQueueLLM(), PROMPT)
    alone = BackgroundCopier.from_settings(s, rewriter=rewriter, validate=lengths_only)
    assert type(alone.cache) is CopyCache and alone.cache.max_entries == 7
    both = BackgroundCopier.from_settings(s, rewriter=rewriter, validate=lengths_only, redis_client=redis_from_settings(s))
    assert isinstance(both.cache, SharedCopyCache) and both.cache.local.max_entries == 7
    assert both.cache.ttl_s == 30.0 and both.cache.claim_s > s.copy_timeout_s  # a claim outlives the rewrite deadline
