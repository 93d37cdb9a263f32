"""Scoring mode and the copy cache wired into /v1/select, against the real bundled llama.cpp server.

Calls are counted by wrappers around the real clients (agent.logprob_llm.LogprobChatLLM for the P scoring
calls, agent.llm.ChatLLM for the background rewrite), never by a fake server.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.llm import Message
from agent.local_server import free_port
from agent.logprob_llm import FirstToken, LogprobLLMLike
from kernel.settings import Settings
from selection.services import build_services
from server.app import create_app
from tests.utils.counting import CountingLLM as CountingChatLLM

RUN_HISTORY = ["run-001", "run-004", "run-009"]
DEADLINE_MS = 60000  # the most a request may ask for: the shared CPU is slow, the deadline is not what is tested
P = 2


class CountingLogprobLLM:
    """Delegates to the real scoring client and counts the calls that reach it."""

    def __init__(self, llm: LogprobLLMLike):
        self.llm, self.calls = llm, 0

    @property
    def model(self) -> str:
        return self.llm.model

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        self.calls += 1
        return await self.llm.afirst_token(messages, top_logprobs=top_logprobs, timeout_s=timeout_s)


def body(**fields: Any) -> dict:
    return {"user_id": f"u-{uuid.uuid4().hex}", "history": RUN_HISTORY, "k": 3, "use_llm": True, "deadline_ms": DEADLINE_MS, **fields}


def score_settings(demo_settings: Settings, llm_url: str) -> Settings:
    update = {
        "llm_url": llm_url, "llm_mode": "score", "score_permutations": P, "max_deadline_ms": DEADLINE_MS,
        "llm_timeout_s": DEADLINE_MS / 1000, "llm_max_candidates": demo_settings.local_llm_max_candidates,
        "copy_timeout_s": DEADLINE_MS / 1000,
    }  # fmt: skip
    return demo_settings.model_copy(update=update)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.llm_server
def test_score_mode_ranks_with_exactly_p_one_token_calls_then_serves_the_cached_rewrite_with_no_copy_call(
    local_llm_url: str, demo_settings: Settings, demo_services, embedder
) -> None:
    settings = score_settings(demo_settings, local_llm_url)
    services = build_services(settings, llm_url=local_llm_url, embedder=embedder, store=demo_services.store)
    sel = services.selector
    scoring = sel.scorer.llm = CountingLogprobLLM(sel.scorer.llm)  # type: ignore[union-attr]
    rewriting = sel.copier.rewriter.llm = CountingChatLLM(sel.copier.rewriter.llm)  # type: ignore[union-attr]
    with TestClient(create_app(settings, services=services, llm_url=local_llm_url)) as c:
        first = c.post("/v1/select", json=body())
        assert first.status_code == 200, first.text
        r1 = first.json()
        assert (r1["llm_used"], r1["degraded"], r1["degraded_reason"]) == (True, False, None), r1
        assert r1["prompt"]["name"] == settings.score_prompt_name and r1["model"] == settings.llm_model
        assert scoring.calls == P  # one request per permutation, nothing else on the hot path
        top = r1["ads"][0]
        assert top["copy"] == top["original"]  # a miss: the advertiser's copy at once, the rewrite queued
        for _ in range(600):  # the background rewrite runs on the app's loop; bounded wait for its outcome
            st = sel.copier.snapshot()  # type: ignore[union-attr]
            if st["generated"] + st["rejected"] + sum(st["failed"].values()) >= 1:
                break
            time.sleep(0.5)
        assert st["generated"] == 1 and rewriting.calls == 1, st  # validated and cached
        second = c.post("/v1/select", json=body())  # another user with the same history: the same cache key
        metrics = c.get("/metrics").text
    r2 = second.json()
    assert (r2["llm_used"], r2["degraded"]) == (True, False), r2
    assert [a["ad_id"] for a in r2["ads"]] == [a["ad_id"] for a in r1["ads"]]
    assert r2["ads"][0]["copy"] != r2["ads"][0]["original"]  # the cached validated rewrite is served ...
    assert rewriting.calls == 1 and scoring.calls == 2 * P  # ... and added no LLM call
    assert metric(metrics, "adselect_copy_cache_hits_total") == 1 and metric(metrics, "adselect_copy_cache_lookups_total") == 2
    assert metric(metrics, "adselect_copy_cache_hit_rate") == 0.5
    assert 'adselect_copy_rewrites_total{outcome="shared_deduped"} 0.0' in metrics  # one process: nothing shared
    assert "# TYPE adselect_copy_cache_store_errors_total counter" in metrics  # an in-memory cache has no store to fail
    assert metric(metrics, "adselect_rewrites_served_total") == 1 and metric(metrics, "adselect_decisions_total") == 2
    assert metric(metrics, "adselect_llm_calls_total") == 2 * P


def test_score_mode_with_the_llm_down_serves_the_fast_path_ranking_and_says_why(demo_settings: Settings, demo_services, embedder) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    settings = score_settings(demo_settings, url)
    services = build_services(settings, llm_url=url, embedder=embedder, store=demo_services.store)
    scoring = services.selector.scorer.llm = CountingLogprobLLM(services.selector.scorer.llm)  # type: ignore[union-attr]
    user = f"u-{uuid.uuid4().hex}"
    with TestClient(create_app(settings, services=services, llm_url=url)) as c:
        fast = c.post("/v1/select", json=body(user_id=user, use_llm=False, deadline_ms=2000)).json()
        down = c.post("/v1/select", json=body(user_id=user, deadline_ms=2000)).json()
    assert (down["llm_used"], down["degraded"], down["degraded_reason"]) == (False, True, "llm_connection"), down
    assert down["prompt"]["name"] == settings.score_prompt_name  # the scoring stage was the one that failed
    assert scoring.calls == P
    assert [a["ad_id"] for a in down["ads"]] == [a["ad_id"] for a in fast["ads"]]
    assert all(a["copy"] == a["original"] for a in down["ads"])
