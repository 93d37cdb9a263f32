"""The selection pipeline on the real demo catalog (embedded Chroma, MiniLM, learned behaviour, the
serving safety stack: eligibility, SQLite frequency caps, breaker, copy validator).

Only the LLM is replaced, and only where a real one cannot misbehave on demand: FakeQueueLLM and
FakeGarbageLLM go through the reranker's ChatLLMLike interface; FakeHangingLLMServer is a real
socket the real ChatLLM connects to. Each request gets its own user id so frequency caps stay out
of the way of tests that compare rankings.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, replace

import numpy as np
import pytest

from kernel.errors import LLMUnavailable
from selection.pipeline import Selector
from kernel.types import Decision, SelectRequest
from agent.breaker import CircuitBreaker, ConcurrencyLimiter
from agent.llm import ChatLLM, ChatLLMLike
from agent.reranker import LLMReranker
from retrieval.features import build_profile, recency_weights
from tests.utils.fakes import FakeGarbageLLM, FakeHangingLLMServer, FakeQueueLLM

RUN_HISTORY = ["run-001", "run-004", "run-009", "run-012"]
GOOD_COPY = {"headline": "Your next road shoe", "description": "A road shoe for your long runs."}


def category(services, ad_id: str) -> str:
    return services.index.ads[services.index.row[ad_id]].category


def with_llm(services, llm: ChatLLMLike, **changes) -> Selector:
    """The session's selector with an LLM stage over `llm` (the real reranker, prompt, breaker, limiter)."""
    s = services.settings
    reranker = LLMReranker.from_settings(s, llm)
    admission = replace(
        services.selector.admission,
        breaker=CircuitBreaker(s.llm_breaker_failures, s.llm_breaker_reset_s),
        limiter=ConcurrencyLimiter(s.llm_max_concurrency),
    )
    return replace(services.selector, reranker=reranker, admission=admission, **changes)


def select(sel: Selector, req: SelectRequest) -> Decision:
    return asyncio.run(sel.aselect(req))


def request(**fields) -> SelectRequest:
    return SelectRequest(**{"user_id": f"u-{uuid.uuid4().hex}", "history": RUN_HISTORY, "k": 3, **fields})


def served(d: Decision) -> list[str]:
    return [a.ad.ad_id for a in d.ads]


def fast_path(services, **fields) -> list[str]:
    return served(select(services.selector, request(use_llm=False, **fields)))


def shown_ids(sel: Selector, req: SelectRequest) -> tuple[list[str], list[str]]:
    """(ids the LLM sees, the real ids they stand for), exactly as the pipeline will send them."""
    stage = sel.prior_stage(req)
    call = sel.reranker.prepare(
        history_ads=stage.history_ads, events=req.events, candidates=stage.candidates[: sel.llm_max_candidates], rewrite=True
    )
    return call.shown_ids, call.candidate_ids


def answer(ranking: list[str], *, justification: str = "You buy road shoes.", **copy: str) -> str:
    return json.dumps({"ranking": ranking, "justification": justification, **(copy or GOOD_COPY)})


# ---- priors -------------------------------------------------------------------------------------


def test_profile_pooling_weights_recent_items_more(demo_services):
    index = demo_services.index
    run, pet = index.row["run-001"], index.row["pet-001"]
    np.testing.assert_allclose(recency_weights(3, 0.5), np.array([1, 2, 4]) / 7, rtol=1e-6)

    def sims(rows, decay):
        p = build_profile(index, rows, decay=decay).vector
        return float(p @ index.vectors[run]), float(p @ index.vectors[pet])

    run_sim, pet_sim = sims([run, pet], 0.5)  # pet is the latest
    assert pet_sim > run_sim
    run_sim, pet_sim = sims([pet, run], 0.5)
    assert run_sim > pet_sim
    run_sim, pet_sim = sims([run, pet], 1.0)  # no decay: both count the same
    assert run_sim == pytest.approx(pet_sim, abs=1e-5)


def test_the_pipeline_pools_with_recency(demo_services):
    """Same items, other order: each ad's `dense` prior is higher when its own kind came last."""
    logged = ["run-023", "pet-009"]

    def dense(history):
        d = select(demo_services.selector, request(history=history, candidates=logged, k=2, use_llm=False))
        return {a.ad.ad_id: a.priors["dense"] for a in d.ads}

    pets_last = dense(["run-001", "run-004", "pet-001", "pet-004"])
    runs_last = dense(["pet-001", "pet-004", "run-001", "run-004"])
    assert pets_last["pet-009"] > runs_last["pet-009"]
    assert runs_last["run-023"] > pets_last["run-023"]


def test_running_shoes_history_gets_running_shoes_ads(demo_services):
    sel = replace(demo_services.selector, rank_by="relevance")
    d = select(sel, request(k=5, use_llm=False))
    assert [category(demo_services, a) for a in served(d)] == ["running shoes"] * 5
    scores = [a.score for a in d.ads]
    assert scores == sorted(scores, reverse=True)


def test_expected_value_orders_by_bid_times_pctr(demo_services):
    """bid × pCTR may put a well-paying, less relevant ad above a relevant cheap one — but never a less
    valuable one above a more valuable one, and the top is still relevant for this history."""
    rel = select(replace(demo_services.selector, rank_by="relevance"), request(k=5, use_llm=False))
    ev = select(replace(demo_services.selector, rank_by="expected_value"), request(k=5, use_llm=False))
    values = [a.expected_value for a in ev.ads]
    assert values == sorted(values, reverse=True)
    assert all(abs(a.expected_value - a.pctr * a.ad.bid) < 1e-5 for a in ev.ads)
    assert category(demo_services, ev.ads[0].ad.ad_id) == "running shoes"
    assert max(values) >= max(a.expected_value for a in rel.ads)


def test_candidates_exclude_history_by_default(demo_services):
    assert demo_services.settings.exclude_history and demo_services.selector.exclude_history
    d = select(demo_services.selector, request(k=20, use_llm=False))
    assert len(d.ranking) > 20 and not set(d.ranking) & set(RUN_HISTORY)
    # The exclusion is what keeps them out: without it the history's own ads come back.
    keep = select(replace(demo_services.selector, exclude_history=False), request(k=20, use_llm=False))
    assert set(keep.ranking) & set(RUN_HISTORY)


def test_logged_candidates_are_exactly_the_ones_ranked(demo_services):
    logged = ["pet-003", "nope-1", "run-010", "cof-002", "run-010", "nope-2"]
    d = select(demo_services.selector, request(history=["run-001", "ghost-9"], candidates=logged, k=5, use_llm=False))
    assert sorted(d.ranking) == ["cof-002", "pet-003", "run-010"]
    assert sorted(served(d)) == sorted(d.ranking)  # k=5 but only three known candidates
    assert d.unknown_ids == ["ghost-9", "nope-1", "nope-2"]


def test_llm_off_is_not_a_degradation(demo_services):
    d = select(demo_services.selector, request(use_llm=False))
    assert (d.llm_used, d.degraded, d.degraded_reason, d.prompt, d.model) == (False, False, None, None, None)
    assert "llm" not in d.timings_ms and {"profile", "candidates", "fusion", "total"} <= set(d.timings_ms)
    assert all(a.copy == a.original and a.llm_rank is None and a.justification is None for a in d.ads)


def test_llm_asked_for_but_disabled_server_side_is_reported(demo_services):
    assert demo_services.selector.reranker is None  # the session's services run without an LLM stage
    d = select(demo_services.selector, request(use_llm=True))
    assert (d.llm_used, d.degraded, d.degraded_reason) == (False, True, "llm_disabled")
    assert served(d) == fast_path(demo_services)


# ---- the LLM stage failing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_llm", "reason"),
    [
        (lambda: FakeQueueLLM().enqueue(LLMUnavailable("connection", "refused")), "llm_connection"),
        (lambda: FakeQueueLLM().enqueue(LLMUnavailable("http_error", "500")), "llm_http_error"),
        (lambda: FakeGarbageLLM(), "llm_invalid_output"),
        (lambda: FakeQueueLLM().enqueue('{"ranking": "run-002", "justification": "x"}'), "llm_invalid_output"),
        (lambda: FakeQueueLLM().enqueue(answer(["evil-1", "run-001"])), "llm_invalid_output"),
    ],
    ids=["unavailable", "http_error", "garbage", "wrong_shape", "no_candidate_id"],
)
def test_llm_failure_serves_the_prior_ranking_with_original_copy(demo_services, make_llm, reason):
    llm = make_llm()
    sel = with_llm(demo_services, llm)
    req = request(use_llm=True)
    d = select(sel, req)
    assert len(llm.calls) == 1
    assert (d.llm_used, d.degraded, d.degraded_reason) == (False, True, reason)
    assert served(d) == fast_path(demo_services)
    assert all(a.copy == a.original and a.llm_rank is None and a.justification is None for a in d.ads)
    assert d.prompt == sel.reranker.prompt_info and d.prompt["sha256"] and "llm" in d.timings_ms


# ---- the LLM stage answering --------------------------------------------------------------------


def llm_led(services, llm: ChatLLMLike) -> Selector:
    """Ordered by relevance with a huge LLM weight: the response order shows what the LLM's ranking became."""
    return with_llm(services, llm, rank_by="relevance", fusion=replace(services.fusion, llm_coef=1e6))


def test_llm_ranking_is_cleaned_before_it_reaches_the_response(demo_services):
    """Foreign ids, history ids and repeats are dropped; what is left keeps the LLM's order."""
    llm = FakeQueueLLM()
    sel = llm_led(demo_services, llm)
    req = request(use_llm=True, k=3)
    shown, real = shown_ids(sel, req)
    s, r = shown[::-1], real[::-1]  # the LLM reverses the prior order, with junk mixed in
    llm.enqueue(answer(["evil-1", s[0], s[0], "run-001", s[1], "evil-2", s[1], s[2]]))

    d = select(sel, req)
    assert (d.llm_used, d.degraded) == (True, False)
    assert served(d) == r[:3] and [a.llm_rank for a in d.ads] == [0, 1, 2]
    assert d.ranking[:3] == r[:3] and len(d.ranking) == len(set(d.ranking))
    assert not {"evil-1", "evil-2", "run-001"} & set(d.ranking)
    # Copy and justification describe the target (the prior top), which the LLM's ranking pushed out of the top 3.
    assert all(a.copy == a.original and a.justification is None for a in d.ads)
    text = json.dumps(asdict(d), default=str)
    assert "evil-1" not in text and "evil-2" not in text


def test_the_target_gets_its_justification_and_validated_copy(demo_services):
    llm = FakeQueueLLM()
    sel = llm_led(demo_services, llm)
    req = request(use_llm=True, k=3)
    shown, real = shown_ids(sel, req)
    llm.enqueue(answer([shown[4], shown[0]], justification="Matches your road shoes."))

    d = select(sel, req)
    assert (d.llm_used, d.degraded, d.degraded_reason) == (True, False, None)
    assert served(d)[:2] == [real[4], real[0]] and d.ads[2].llm_rank is None
    # The copy was asked for the target: the ad the service expected to serve before the LLM spoke (the prior
    # top, real[0]); it goes with that ad wherever the LLM's weight moved it.
    target = d.ads[1]
    assert target.ad.ad_id == real[0]
    assert (target.copy.headline, target.copy.description) == (GOOD_COPY["headline"], GOOD_COPY["description"])
    assert target.original.headline == target.ad.title and target.justification == "Matches your road shoes."
    assert all(a.copy == a.original and a.justification is None for a in (d.ads[0], d.ads[2]))
    assert d.model == sel.reranker.model and d.prompt == sel.reranker.prompt_info and not d.copy_rejections
    # What the LLM saw: the top of the prior ranking and none of the history ads as candidates.
    candidates_block = llm.calls[0]["messages"][-1]["content"].split("Candidates:")[1]
    assert all(i in candidates_block for i in shown) and "run-001" not in candidates_block


def test_rewrite_failing_the_validator_serves_the_original_copy(demo_services):
    llm = FakeQueueLLM()
    sel = llm_led(demo_services, llm)
    req = request(use_llm=True, k=3)
    shown, real = shown_ids(sel, req)
    llm.enqueue(answer([shown[0]], headline="Best shoe ever, 90% off", description="Order now at www.shoes.com"))

    d = select(sel, req)
    assert d.llm_used and not d.degraded and served(d)[0] == real[0]
    assert d.ads[0].copy == d.ads[0].original
    assert {"ungrounded_claim", "ungrounded_number", "url"} <= set(d.copy_rejections)


def test_llm_cannot_move_the_ranking_without_a_learned_weight(demo_services):
    llm = FakeQueueLLM()
    sel = with_llm(demo_services, llm, rank_by="relevance", fusion=replace(demo_services.fusion, llm_coef=0.0))
    req = request(use_llm=True, k=3)
    shown, real = shown_ids(sel, req)
    llm.enqueue(answer(shown[::-1]))
    d = select(sel, req)
    assert d.llm_used and served(d) == real[:3]


# ---- the deadline -------------------------------------------------------------------------------


def test_hanging_llm_is_cut_at_the_deadline(demo_services):
    deadline_ms, margin_s = 300, 1.0  # the uncut call would take 30 s; 1 s is above 2-core scheduling noise
    with FakeHangingLLMServer() as server, ChatLLM(base_url=server.base_url, model="hangs", timeout_s=30) as llm:
        sel = with_llm(demo_services, llm)
        req = request(use_llm=True, deadline_ms=deadline_ms)
        t = time.perf_counter()
        d = select(sel, req)
        elapsed = time.perf_counter() - t
        assert server.connections, "the LLM request never reached the server"
    assert elapsed < deadline_ms / 1000 + margin_s
    assert elapsed > (deadline_ms - sel.admission.margin_ms) / 1000 * 0.8  # it did wait for the LLM
    assert (d.llm_used, d.degraded, d.degraded_reason) == (False, True, "llm_timeout")
    assert served(d) == fast_path(demo_services)
