"""Admission to the LLM stage: a limiter slot, the circuit breaker and the time budget, as one object.

    with admission.enter(deadline_ms=req.deadline_ms, started=started) as permit:
        if permit.refused is None:
            result = await call_the_llm(timeout_s=permit.budget_s)
    reason = permit.reason          # None: the LLM answered; else why the fast path is served

A refused permit holds nothing. A granted one holds a limiter slot (and, when the breaker is half-open,
its one probe) and gives both back on every exit of the block:

- the block ends normally: the breaker records a success;
- the block raises an `Exception` (any type: the client's LLMUnavailable, LLMOutputInvalid from parsing,
  a PromptError, an SDK error nobody mapped, a bug): `kernel.reasons.degradation_for` names it,
  `permit.failed` holds the reason and the exception goes no further: the LLM stage is optional, its
  failure is a degradation, never a failed request. Availability failures (timeout, connection, HTTP
  error, any unexpected error) count against the breaker; invalid output is a success (the model answered);
- the block is cancelled (`CancelledError`, or any other BaseException): the probe is released without a
  verdict and the exception propagates.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from kernel.reasons import AVAILABILITY_FAILURES, DegradedReason, degradation_for

log = logging.getLogger(__name__)


class Breaker(Protocol):
    """What admission needs of agent.breaker.CircuitBreaker."""

    def allow(self) -> bool: ...
    def record_success(self) -> None: ...
    def record_failure(self) -> None: ...
    def release_probe(self) -> None: ...


class Limiter(Protocol):
    """What admission needs of agent.breaker.ConcurrencyLimiter."""

    @property
    def in_flight(self) -> int: ...
    def try_acquire(self) -> bool: ...
    def release(self) -> None: ...


@dataclass(slots=True)
class Permit:
    budget_s: float  # time the call may take (0 when refused)
    refused: DegradedReason | None = None  # set: no call may be made, nothing is held
    failed: DegradedReason | None = None  # set on exit: the call was made and raised

    @property
    def reason(self) -> DegradedReason | None:
        return self.refused or self.failed


@dataclass
class LLMAdmission:
    breaker: Breaker | None = None  # None: never refuses for failures (offline replay)
    limiter: Limiter | None = None  # None: no concurrency limit
    margin_ms: int = 30  # kept back from the deadline for fusion, caps and the response
    max_deadline_ms: int = 10000  # a request's deadline is capped at this

    def budget_s(self, *, deadline_ms: int, started: float) -> float:
        """Seconds left for the LLM call of a request that started at `started` (perf_counter)."""
        deadline = min(deadline_ms, self.max_deadline_ms)
        return (deadline - (time.perf_counter() - started) * 1000 - self.margin_ms) / 1000

    @contextmanager
    def enter(self, *, deadline_ms: int, started: float) -> Iterator[Permit]:
        budget = self.budget_s(deadline_ms=deadline_ms, started=started)
        if budget <= 0:
            yield Permit(0.0, refused=DegradedReason.DEADLINE_EXHAUSTED)
            return
        if self.limiter is not None and not self.limiter.try_acquire():
            yield Permit(0.0, refused=DegradedReason.LLM_BUSY)
            return
        if self.breaker is not None and not self.breaker.allow():
            if self.limiter is not None:
                self.limiter.release()
            yield Permit(0.0, refused=DegradedReason.LLM_BREAKER_OPEN)
            return
        permit = Permit(budget)
        try:
            yield permit
        except Exception as exc:  # noqa: BLE001 - every failure of the optional stage is a degradation
            permit.failed = degradation_for(exc)
            self._verdict(permit.failed)
            if permit.failed is DegradedReason.LLM_ERROR:  # not a known outage: keep the traceback
                log.warning("llm stage failed unexpectedly", exc_info=True, extra={"reason": str(permit.failed)})
            else:
                log.info("llm stage degraded", extra={"reason": str(permit.failed), "error": type(exc).__name__})
        except BaseException:
            if self.breaker is not None:
                self.breaker.release_probe()
            raise
        else:
            self._verdict(None)
        finally:
            if self.limiter is not None:
                self.limiter.release()

    def _verdict(self, reason: DegradedReason | None) -> None:
        if self.breaker is None:
            return
        if reason in AVAILABILITY_FAILURES:
            self.breaker.record_failure()
        else:  # answered (well, or with output that failed validation: the model's quality, not its availability)
            self.breaker.record_success()
