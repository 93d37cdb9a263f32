"""Fault injection: 300 logged impressions replayed against a running service while its real LLM server
(llama.cpp + SmolLM2, owned by this test) is killed with SIGKILL partway and started again.

Timeline (seconds from the first request; requests are sent open-loop, one every REPLAY_S / N):

    0 ── LLM up ── KILL_AT ── LLM down ── RESTART_AT ── (breaker recovers) ── LLM up ── REPLAY_S

Claims checked:
- no response >= 500; every response is a valid SelectResponseBody;
- the fault reasons (llm_connection, llm_timeout, llm_http_error, llm_breaker_open) appear only on
  requests that overlap the outage: answered after the kill and sent before `ready + RECOVERY_S`,
  where RECOVERY_S = 2 x breaker reset (one failed probe on a stale pooled connection, then the next)
  + one LLM deadline (the probe itself); load and quality reasons (llm_busy: the one LLM slot is taken;
  llm_invalid_output) may appear at any time and are reported;
- the LLM is used before the kill, never by a request sent and answered while it was down, and again
  within RESUME_WITHIN_S (= RECOVERY_S, 24 s) of the restart: the first request sent after the
  restart that used the LLM has its answer by then.

The LLM stage is kept small (4 candidates, 2 ranked ids, titles only, no rewrite) and has one slot, so
most requests take the fast path as llm_busy: the replay measures availability, not LLM throughput.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from dataclasses import dataclass

import httpx
import pytest

from agent.llm import ChatLLM
from agent.local_server import LocalLLMServer, free_port
from server.app import create_app
from server.protocol import SelectResponseBody
from tests.security.conftest import load_impressions, reranker_for, services_with
from tests.security.live import LiveServer

N_IMPRESSIONS = 300
REPLAY_S = 60.0
KILL_AT_S = 12.0
RESTART_AT_S = 20.0
DEADLINE_MS = 20_000  # SmolLM2 takes 1-10 s a call on 2 shared cores; a cold first call after a start, more
BREAKER_RESET_S = 2.0
RECOVERY_S = 2 * BREAKER_RESET_S + DEADLINE_MS / 1000
RESUME_WITHIN_S = RECOVERY_S

FAULT_REASONS = {"llm_connection", "llm_timeout", "llm_http_error", "llm_breaker_open"}
ANYTIME_REASONS = {"llm_busy", "llm_invalid_output"}


@dataclass
class Outcome:
    sent: float
    answered: float
    status: int
    body: dict


pytestmark = pytest.mark.llm_server


def test_llm_killed_and_restarted_under_replay(demo_settings, demo_services):
    port = free_port()
    settings = demo_settings.model_copy(
        update=dict(
            llm_url=f"http://127.0.0.1:{port}/v1", llm_max_candidates=4, llm_max_ranked=2, llm_max_text_chars=0,
            llm_max_tokens=128, llm_breaker_failures=2, llm_breaker_reset_s=BREAKER_RESET_S, max_deadline_ms=DEADLINE_MS,
        )
    )  # fmt: skip
    llm_server = LocalLLMServer.from_settings(settings, port=port).start()
    llm = ChatLLM.from_settings(settings)
    svc = services_with(
        demo_services, reranker=reranker_for(llm, settings), breaker_failures=2, breaker_reset_s=BREAKER_RESET_S, llm_concurrency=1
    )
    imps = load_impressions(N_IMPRESSIONS)
    marks: dict[str, float] = {}

    async def replay(url: str, t0: float) -> list[Outcome]:
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_MS / 1000 + 10) as client:

            async def one(i: int, imp: dict) -> Outcome:
                await asyncio.sleep(max(0.0, t0 + i * REPLAY_S / N_IMPRESSIONS - time.monotonic()))
                body = {"user_id": f"fault-{i}-{imp['user_id']}", "history": imp["history"], "k": 3, "rewrite": False, "deadline_ms": DEADLINE_MS}
                sent = time.monotonic() - t0
                r = await client.post("/v1/select", json=body)
                return Outcome(sent, time.monotonic() - t0, r.status_code, r.json())

            async def chaos() -> None:
                nonlocal llm_server
                await asyncio.sleep(KILL_AT_S)
                os.kill(llm_server.pid, signal.SIGKILL)
                marks["kill"] = time.monotonic() - t0
                llm_server.stop()  # reaps the dead process
                await asyncio.sleep(RESTART_AT_S - KILL_AT_S)
                llm_server = LocalLLMServer.from_settings(settings, port=port)
                await asyncio.to_thread(llm_server.start)
                marks["ready"] = time.monotonic() - t0

            results = await asyncio.gather(chaos(), *(one(i, imp) for i, imp in enumerate(imps)))
            return list(results[1:])

    try:
        with LiveServer(create_app(settings, services=svc)) as server:
            warm = {"user_id": "fault-warmup", "history": imps[0]["history"], "rewrite": False, "deadline_ms": DEADLINE_MS}
            httpx.post(f"{server.url}/v1/select", json=warm, timeout=DEADLINE_MS / 1000 + 10)  # the model's cold first call
            outcomes = asyncio.run(replay(server.url, time.monotonic()))
    finally:
        llm.close()
        llm_server.stop()

    kill, ready = marks["kill"], marks["ready"]
    reasons = collections.Counter(o.body.get("degraded_reason") for o in outcomes)
    used = [o for o in outcomes if o.status == 200 and o.body["llm_used"]]
    resumed = min((o.answered for o in used if o.sent >= ready), default=float("inf"))
    print(
        f"\nfault injection: {len(outcomes)} requests, kill at {kill:.1f}s, ready at {ready:.1f}s, "
        f"LLM used by {len(used)}, first LLM answer after restart at +{resumed - ready:.1f}s; reasons {dict(reasons)}"
    )

    assert len(outcomes) >= 300
    assert max(o.status for o in outcomes) < 500
    assert all(o.status == 200 for o in outcomes)
    for o in outcomes:
        SelectResponseBody.model_validate(o.body)
    assert set(reasons) - {None} <= FAULT_REASONS | ANYTIME_REASONS, reasons
    for o in outcomes:
        if o.body["degraded_reason"] in FAULT_REASONS:
            assert o.answered >= kill and o.sent <= ready + RECOVERY_S, (o.sent, o.answered, o.body["degraded_reason"])
    assert any(o.answered < kill for o in used), "the LLM was never used before the kill"
    assert not [o for o in used if o.sent > kill and o.answered < ready], "LLM used while it was down"
    assert sum(o.body["degraded_reason"] in FAULT_REASONS for o in outcomes) > 0, "the outage went unnoticed"
    assert resumed - ready <= RESUME_WITHIN_S
