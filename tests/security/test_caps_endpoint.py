"""Frequency caps through the endpoint: 50 parallel requests for one user never exceed a cap."""
from __future__ import annotations

import asyncio
import collections
import uuid

import httpx

from selection.caps import CapConfig, SQLiteCapStore
from kernel.hashing import secret_from_settings, user_key
from server.app import create_app
from tests.security.conftest import reranker_for, services_with
from tests.security.fakes import FakeFunctionLLM
from tests.security.live import LiveServer

PER_AD, PER_ADVERTISER = 2, 5
N_PARALLEL = 50


def test_fifty_parallel_requests_for_one_user_respect_both_caps(demo_settings, demo_services, tmp_path):
    """Requests interleave in the (fake) LLM stage, so they reach the cap check in arbitrary order."""
    caps = SQLiteCapStore(tmp_path / "caps.sqlite", config=CapConfig(max_per_ad=PER_AD, max_per_advertiser=PER_ADVERTISER, window_s=3600))
    svc = services_with(demo_services, reranker=reranker_for(FakeFunctionLLM(delay_s=0.01), demo_settings), llm_concurrency=64, caps=caps)
    user = f"capped-{uuid.uuid4().hex}"
    body = {"user_id": user, "history": ["run-001", "run-004", "run-009"], "k": 5, "deadline_ms": 10000}

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=N_PARALLEL)) as client:
            return await asyncio.gather(*(client.post("/v1/select", json={**body, "use_llm": i % 2 == 0}) for i in range(N_PARALLEL)))

    with LiveServer(create_app(demo_settings, services=svc)) as server:
        responses = asyncio.run(fire(server.url))

    assert [r.status_code for r in responses] == [200] * N_PARALLEL
    per_ad: collections.Counter[str] = collections.Counter()
    per_adv: collections.Counter[str] = collections.Counter()
    for r in responses:
        for ad in r.json()["ads"]:
            per_ad[ad["ad_id"]] += 1
            per_adv[ad["advertiser"]] += 1
    assert per_ad and max(per_ad.values()) <= PER_AD, per_ad.most_common(3)
    assert max(per_adv.values()) <= PER_ADVERTISER, per_adv.most_common(3)
    assert sum(per_ad.values()) < N_PARALLEL * body["k"]  # the caps did bite
    key = user_key(user, secret=secret_from_settings(demo_settings))
    for ad_id, n in per_ad.items():  # every served ad was recorded, and only those
        assert caps.count(key, ad_id=ad_id) == n
