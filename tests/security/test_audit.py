"""Audit: one line per served /v1/select, none lost under concurrency; users only as keyed hashes and
free-text events never in any log line (audit, app, uvicorn access log, LLM client)."""
from __future__ import annotations

import asyncio
import logging
import random
import uuid

import httpx

from kernel.hashing import secret_from_settings, user_key
from server.app import create_app
from tests.security.conftest import load_impressions, reranker_for, services_with
from tests.security.fakes import FakeFunctionLLM
from tests.security.live import LiveServer
from tests.utils.fakes import FakeHangingLLMServer

N_REQUESTS = 120
CONCURRENCY = 16


async def _fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(body: dict) -> httpx.Response:
            async with sem:
                return await client.post("/v1/select", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_one_audit_line_per_response_under_concurrency(demo_settings, demo_services, audit_log):
    """120 requests, 16 at a time, half through a (fake, interleaving) LLM stage: as many audit lines as
    200 responses, with exactly their request ids, each naming the user by keyed hash only."""
    llm = FakeFunctionLLM(delay_s=0.02)
    svc = services_with(demo_services, reranker=reranker_for(llm, demo_settings), llm_concurrency=8)
    rng = random.Random(7)
    imps = load_impressions(N_REQUESTS)
    bodies = [
        {"user_id": f"audit-{i}-{imp['user_id']}", "history": imp["history"], "k": 3, "use_llm": rng.random() < 0.5, "deadline_ms": 5000}
        for i, imp in enumerate(imps)
    ]
    with LiveServer(create_app(demo_settings, services=svc)) as server:
        responses = asyncio.run(_fire(server.url, bodies))

    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    lines = audit_log.lines()
    assert len(lines) == len(responses) == N_REQUESTS
    assert sorted(line["request_id"] for line in lines) == sorted(r.json()["request_id"] for r in responses)
    by_id = {line["request_id"]: line for line in lines}
    secret = secret_from_settings(demo_settings)
    for body, r in zip(bodies, responses):
        line = by_id[r.json()["request_id"]]
        assert line["event"] == "impression"
        assert line["user"] == user_key(body["user_id"], secret=secret)
        assert line["chosen"] == [a["ad_id"] for a in r.json()["ads"]]
        assert line["llm_used"] == r.json()["llm_used"]
        assert {"profile", "candidates", "total"} <= set(line["timings_ms"])
    assert any(line["llm_used"] for line in lines) and any(not line["llm_used"] for line in lines)


def _leaks(records: list[logging.LogRecord], secrets: list[str]) -> list[str]:
    found = []
    for rec in records:
        fields = [rec.getMessage(), *(str(v) for v in rec.__dict__.values())]
        if rec.exc_info:
            fields.append(logging.Formatter().formatException(rec.exc_info))
        for s in secrets:
            if any(s in f for f in fields):
                found.append(f"{rec.name}: {s!r} in {rec.getMessage()[:120]!r}")
    return found


def test_no_raw_user_id_or_event_text_in_any_log(demo_settings, demo_services, all_logs):
    """Everything logged at DEBUG and up while serving, through a real LLM client (that times out on a
    hanging server, so its warning paths run too), 422s and the uvicorn access log: no raw user id and
    no event text anywhere."""
    from agent.llm import ChatLLM

    marker = uuid.uuid4().hex[:12]
    user_id = f"alice.smith+{marker}@example.com"
    events = [f"searched: divorce lawyer near {marker}", f"viewed: pregnancy test {marker[::-1]}"]
    with FakeHangingLLMServer() as hanging:
        settings = demo_settings.model_copy(update={"llm_url": hanging.base_url})
        svc = services_with(demo_services, reranker=reranker_for(ChatLLM.from_settings(settings), settings), breaker_failures=2)
        with LiveServer(create_app(demo_settings, services=svc)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
            for use_llm in (True, True, True, False):  # timeouts, then the breaker opens
                r = client.post("/v1/select", json={"user_id": user_id, "history": ["run-001"], "events": events, "use_llm": use_llm, "deadline_ms": 300})
                assert r.status_code == 200
            bad = client.post("/v1/select", json={"user_id": user_id, "events": events, "k": 999})
            assert bad.status_code == 422
            assert client.post("/v1/select", json={"user_id": user_id, "events": events, "surprise": marker}).status_code == 422
    names = {rec.name for rec in all_logs}
    assert "adselect.audit" in names and "uvicorn.access" in names  # the logs were really captured
    assert _leaks(all_logs, [user_id, marker, *events]) == []
