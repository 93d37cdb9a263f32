"""LLM admission: the limiter slot and the breaker's probe come back on every exit of the LLM stage.

Through `Selector.aselect` on the real demo catalog; only the reranker is a fake, because a real one
cannot raise a KeyError or hang until cancelled on demand.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import pytest

from agent.breaker import BreakerState, CircuitBreaker, ConcurrencyLimiter
from kernel.errors import PromptError
from kernel.types import SelectRequest
from selection.admission import LLMAdmission

HISTORY = ["run-001", "run-004", "run-009", "run-012"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeRaisingReranker:
    """A reranker whose call raises `exc` (an exception no client maps)."""

    model = "fake-raising"
    prompt_info = {"name": "fake", "version": "1", "sha256": "0" * 64}

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    async def arerank(self, **_: object):
        self.calls += 1
        raise self.exc


class FakeStuckReranker:
    """A reranker whose call never returns; `entered` is set once it is waiting."""

    model = "fake-stuck"
    prompt_info = {"name": "fake", "version": "1", "sha256": "0" * 64}

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def arerank(self, **_: object):
        self.entered.set()
        await asyncio.Event().wait()


def request() -> SelectRequest:
    return SelectRequest(user_id=f"u-{uuid.uuid4().hex}", history=HISTORY, k=3, deadline_ms=10_000)


def selector(services, reranker, *, breaker: CircuitBreaker, slots: int = 1):
    admission = LLMAdmission(breaker=breaker, limiter=ConcurrencyLimiter(slots), max_deadline_ms=30_000)
    return replace(services.selector, reranker=reranker, admission=admission)


@pytest.mark.parametrize("exc", [KeyError("ranking"), PromptError("bad template"), TypeError("no choices")], ids=type)
def test_an_unexpected_error_is_a_degradation_that_counts_against_the_breaker(demo_services, exc):
    breaker = CircuitBreaker(2, 30.0)
    reranker = FakeRaisingReranker(exc)
    sel = selector(demo_services, reranker, breaker=breaker)
    fast = asyncio.run(sel.aselect(replace(request(), use_llm=False)))
    for _ in range(3):  # more than the one slot: a leaked slot would make the next one llm_busy
        d = asyncio.run(sel.aselect(request()))
        assert (d.llm_used, d.degraded) == (False, True)
        assert d.ads and all(a.copy == a.original for a in d.ads)
        assert sel.limiter.in_flight == 0
    assert [a.ad.ad_id for a in d.ads] == [a.ad.ad_id for a in fast.ads]
    assert reranker.calls == 2 and d.degraded_reason == "llm_breaker_open"  # two failures opened it
    assert breaker.state is BreakerState.OPEN and breaker.stats().times_opened == 1


def test_the_first_failures_are_named_llm_error(demo_services):
    sel = selector(demo_services, FakeRaisingReranker(KeyError("x")), breaker=CircuitBreaker(5, 30.0))
    d = asyncio.run(sel.aselect(request()))
    assert d.degraded_reason == "llm_error" and d.prompt == FakeRaisingReranker.prompt_info
    assert sel.breaker.stats().consecutive_failures == 1


def test_cancelled_mid_call_gives_back_the_slot_and_the_half_open_probe(demo_services):
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    assert breaker.allow()
    breaker.record_failure()  # open
    clock.t += 10.0  # the next allow() is the half-open probe
    reranker = FakeStuckReranker()
    sel = selector(demo_services, reranker, breaker=breaker)

    async def cancel_mid_call() -> None:
        task = asyncio.create_task(sel.aselect(request()))
        await asyncio.wait_for(reranker.entered.wait(), timeout=30)
        assert sel.limiter.in_flight == 1 and breaker.state is BreakerState.HALF_OPEN
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_mid_call())
    assert sel.limiter.in_flight == 0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow(), "the cancelled call still holds the half-open probe"
    assert breaker.stats().times_opened == 1  # a cancellation is no verdict


def test_a_refused_permit_holds_nothing():
    limiter = ConcurrencyLimiter(1)
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    breaker.allow()
    breaker.record_failure()
    admission = LLMAdmission(breaker=breaker, limiter=limiter)
    with admission.enter(deadline_ms=5000, started=time.perf_counter()) as permit:
        assert permit.refused == "llm_breaker_open" and limiter.in_flight == 0
    with admission.enter(deadline_ms=10, started=time.perf_counter() - 1) as permit:
        assert permit.refused == "deadline_exhausted"
    assert limiter.in_flight == 0
