"""An OpenAI-compatible endpoint that answers 200 with a broken body (no `choices`, an HTML gateway page,
truncated JSON) through the real ChatLLM, the real server and a real HTTP client.

Each such answer is an unmapped SDK error (TypeError, ValueError, JSONDecodeError). Sequential requests,
more of them than LLM slots: every one is answered 200, degraded with a reason that counts against the
breaker (llm_error) until the breaker opens (llm_breaker_open), never llm_busy; afterwards no LLM slot
is held and the breaker says what happened.
"""
from __future__ import annotations

import httpx
import pytest

from agent.breaker import BreakerState
from agent.llm import ChatLLM
from server.app import create_app
from server.protocol import SelectResponseBody
from tests.security.conftest import load_impressions, reranker_for, services_with
from tests.security.live import LiveServer
from tests.utils.fakes import FakeBrokenLLMServer

LLM_SLOTS = 2
BREAKER_FAILURES = 4
N_REQUESTS = 2 * LLM_SLOTS + BREAKER_FAILURES  # more than the slots, and past the breaker's threshold


@pytest.mark.parametrize("mode", sorted(FakeBrokenLLMServer.BODIES))
def test_broken_200_bodies_degrade_and_release_the_llm_slot(demo_settings, demo_services, mode):
    imps = load_impressions(N_REQUESTS)
    with FakeBrokenLLMServer(mode) as broken:
        settings = demo_settings.model_copy(update={"llm_url": broken.base_url})
        llm = ChatLLM.from_settings(settings)
        svc = services_with(
            demo_services, reranker=reranker_for(llm, settings), breaker_failures=BREAKER_FAILURES, llm_concurrency=LLM_SLOTS
        )
        with LiveServer(create_app(demo_settings, services=svc)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            responses = [
                client.post("/v1/select", json={"user_id": f"broken-{mode}-{i}", "history": imp["history"], "k": 3, "deadline_ms": 5000})
                for i, imp in enumerate(imps)
            ]
        llm.close()
        calls = broken.requests

    assert [r.status_code for r in responses] == [200] * N_REQUESTS, [r.text[:200] for r in responses]
    bodies = [SelectResponseBody.model_validate(r.json()) for r in responses]
    assert all(b.degraded and not b.llm_used and b.ads for b in bodies)
    reasons = [b.degraded_reason for b in bodies]
    assert reasons == ["llm_error"] * BREAKER_FAILURES + ["llm_breaker_open"] * (N_REQUESTS - BREAKER_FAILURES), reasons
    assert calls == BREAKER_FAILURES  # the open breaker kept the later requests away from the endpoint
    assert svc.selector.limiter.in_flight == 0
    stats = svc.selector.breaker.stats()
    assert (stats.state, stats.times_opened, stats.consecutive_failures) == (BreakerState.OPEN, 1, BREAKER_FAILURES)
