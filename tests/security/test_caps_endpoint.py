"""Frequency caps through the endpoint: 50 parallel requests for one user never exceed a cap; a Redis cap
store killed mid-traffic and restarted: no 5xx, the caps_on_error policy holds, the counts are exact again."""
from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from selection.caps import CapConfig, SQLiteCapStore, open_cap_store
from kernel.hashing import secret_from_settings, user_key
from server.app import create_app
from tests.security.conftest import reranker_for, services_with
from tests.security.fakes import FakeFunctionLLM
from tests.security.live import LiveServer
from tests.utils.redis_server import RedisProcess

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


# ---- the cap store dying mid-traffic ---------------------------------------------------------------

REDIS_PER_AD, REDIS_PER_ADVERTISER = 2, 50
WORKERS = 4
PHASE_REQUESTS = 12  # answered per phase before the next step
WAIT_S = 60.0  # bound on each phase


@dataclass
class Outcome:
    user: str
    sent: str  # phase when sent: up | down | back
    answered: str
    status: int
    body: dict


@pytest.mark.parametrize("policy", ["closed", "open"])
def test_redis_killed_mid_traffic_and_restarted(demo_settings, demo_services, tmp_path, audit_log, policy):
    """4 clients keep sending; redis-server is SIGKILLed with requests in flight, then started again on the
    same port and data dir. No 5xx; while it is down the policy holds (closed: nothing whose cap is unknown
    is served; open: it is served and flagged); afterwards the stored counts equal what was served with a
    known cap, per ad and per advertiser, and every request has its audit line."""
    with RedisProcess(tmp_path / "redis") as redis_server:
        settings = demo_settings.model_copy(
            update={"redis_url": redis_server.url, "cap_max_per_ad": REDIS_PER_AD,
                    "cap_max_per_advertiser": REDIS_PER_ADVERTISER, "caps_on_error": policy}
        )  # fmt: skip
        caps = open_cap_store(settings)
        svc = services_with(demo_services, caps=caps, caps_on_error=policy)
        users = [f"redis-{policy}-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
        outcomes: list[Outcome] = []
        phase = ["up"]

        async def until(done, what: str) -> None:
            deadline = time.monotonic() + WAIT_S
            while not done():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.01)

        def answered_in(name: str, *, known_caps: bool = False) -> int:
            return sum(o.sent == o.answered == name and (not known_caps or not o.body["caps_unknown"]) for o in outcomes)

        async def traffic(url: str) -> str:
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def worker(w: int) -> None:
                    i = 0
                    while not stop.is_set():
                        user = users[(w + i) % len(users)]
                        i += 1
                        sent = phase[0]
                        body = {"user_id": user, "history": ["run-001", "run-004", "run-009"], "k": 3, "use_llm": False}
                        r = await client.post("/v1/select", json=body)
                        outcomes.append(Outcome(user, sent, phase[0], r.status_code, r.json()))

                async def chaos() -> None:
                    try:
                        await until(lambda: answered_in("up") >= PHASE_REQUESTS, "traffic with Redis up")
                        redis_server.kill()
                        phase[0] = "down"
                        await until(lambda: answered_in("down") >= PHASE_REQUESTS, "traffic with Redis down")
                        phase[0] = "restarting"
                        await asyncio.to_thread(redis_server.start)
                        phase[0] = "back"
                        await until(lambda: answered_in("back", known_caps=True) >= PHASE_REQUESTS, "caps known again")
                    finally:
                        stop.set()

                await asyncio.gather(chaos(), *(worker(w) for w in range(WORKERS)))
                return (await client.get("/metrics")).text

        with LiveServer(create_app(settings, services=svc)) as server:
            metrics_text = asyncio.run(traffic(server.url))

        assert [o.status for o in outcomes if o.status >= 500] == []
        assert all(o.status == 200 for o in outcomes), collections.Counter(o.status for o in outcomes)
        down = [o for o in outcomes if o.sent == o.answered == "down"]
        for o in outcomes:
            served = [a["ad_id"] for a in o.body["ads"]]
            unknown = o.body["caps_unknown"]
            if policy == "closed":
                assert not set(served) & set(unknown)
            else:
                assert set(unknown) <= set(served)
        for o in down:  # every cap unknown while Redis was gone
            if policy == "closed":
                assert o.body["ads"] == [] and len(o.body["caps_unknown"]) == 3
            else:
                assert [a["ad_id"] for a in o.body["ads"]] == o.body["caps_unknown"] and len(o.body["ads"]) == 3

        # Exact again: what Redis holds is what was served with a known cap, per ad and per advertiser.
        per_ad: collections.Counter[tuple[str, str]] = collections.Counter()
        per_adv: collections.Counter[tuple[str, str]] = collections.Counter()
        for o in outcomes:
            for a in o.body["ads"]:
                if a["ad_id"] not in o.body["caps_unknown"]:
                    per_ad[o.user, a["ad_id"]] += 1
                    per_adv[o.user, a["advertiser"]] += 1
        assert per_ad and max(per_ad.values()) <= REDIS_PER_AD
        secret = secret_from_settings(settings)
        for (user, ad_id), n in per_ad.items():
            assert caps.count(user_key(user, secret=secret), ad_id=ad_id) == n, (user, ad_id)
        for (user, adv), n in per_adv.items():
            assert caps.count(user_key(user, secret=secret), advertiser=adv) == n, (user, adv)
        caps.close()

    lines = {line["request_id"]: line for line in audit_log.lines()}
    assert set(lines) == {o.body["request_id"] for o in outcomes}
    assert all(lines[o.body["request_id"]]["caps_unknown"] == o.body["caps_unknown"] for o in outcomes)
    action = "skipped" if policy == "closed" else "served"
    n_unknown = sum(len(o.body["caps_unknown"]) for o in outcomes)
    assert n_unknown >= 3 * len(down) > 0
    assert f'adselect_caps_unknown_total{{action="{action}"}} {float(n_unknown)}' in metrics_text
