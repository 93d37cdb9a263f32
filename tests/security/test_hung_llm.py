"""An LLM server that accepts connections and never answers: every request still returns by its deadline."""
from __future__ import annotations

import asyncio
import time

import httpx

from agent.llm import ChatLLM
from server.app import create_app
from server.protocol import SelectResponseBody
from tests.security.conftest import load_impressions, reranker_for, services_with
from tests.security.live import LiveServer
from tests.utils.fakes import FakeHangingLLMServer

DEADLINE_MS = 400
SLACK_MS = 1000  # noise on 2 shared cores stays far below this; an uncut call would take llm_timeout_s (30 s)
N_REQUESTS = 50
CONCURRENCY = 4


def test_every_request_is_cut_at_its_deadline(demo_settings, demo_services, frozen_gc):
    """The breaker is set never to open, so each of the 50 requests waits for the LLM until its deadline."""
    imps = load_impressions(N_REQUESTS)

    async def fire(url: str) -> list[tuple[float, httpx.Response]]:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await client.get("/healthz")

            async def one(i: int, imp: dict) -> tuple[float, httpx.Response]:
                async with sem:
                    body = {"user_id": f"hung-{i}", "history": imp["history"], "k": 3, "deadline_ms": DEADLINE_MS}
                    t = time.perf_counter()
                    r = await client.post("/v1/select", json=body)
                    return time.perf_counter() - t, r

            return await asyncio.gather(*(one(i, imp) for i, imp in enumerate(imps)))

    with FakeHangingLLMServer() as hanging:
        settings = demo_settings.model_copy(update={"llm_url": hanging.base_url})
        llm = ChatLLM.from_settings(settings)
        svc = services_with(demo_services, reranker=reranker_for(llm, settings), breaker_failures=10_000, llm_concurrency=64)
        with LiveServer(create_app(demo_settings, services=svc)) as server:
            results = asyncio.run(fire(server.url))
        llm.close()

    latencies_ms = sorted(t * 1000 for t, _ in results)
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
    print(f"hung LLM: deadline {DEADLINE_MS} ms, p50 {latencies_ms[len(latencies_ms) // 2]:.0f} ms, p99 {p99:.0f} ms, max {latencies_ms[-1]:.0f} ms")
    for _, r in results:
        assert r.status_code == 200
        d = SelectResponseBody.model_validate(r.json())
        assert d.degraded and d.degraded_reason == "llm_timeout" and not d.llm_used and d.ads
    assert latencies_ms[-1] <= DEADLINE_MS + SLACK_MS  # every request, not a percentile of 50
