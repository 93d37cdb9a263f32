"""Guards around the LLM call: a circuit breaker and a non-blocking concurrency limiter.

Both are thread-safe and never block: a refused caller takes the fast path (no LLM) at once.

    if not limiter.try_acquire():            # or: with limiter.slot() as ok: ...
        return fast_path("busy")
    try:
        if not breaker.allow():
            return fast_path("breaker_open")
        try:
            result = call_llm()
        except LLMUnavailable:
            breaker.record_failure()
            raise
        breaker.record_success()
    finally:
        limiter.release()

`breaker.guard()` and `limiter.slot()` wrap the same steps as context managers.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kernel.errors import LLMUnavailable

log = logging.getLogger(__name__)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """0 closed, 1 half-open, 2 open: a number for a metrics gauge."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


@dataclass(frozen=True, slots=True)
class BreakerStats:
    state: BreakerState
    consecutive_failures: int
    times_opened: int
    rejected: int  # allow() calls answered False


class CircuitBreaker:
    """closed --N consecutive failures--> open --reset_after_s--> half-open (one probe) --> closed | open.

    - closed: every call is allowed; a success resets the failure count.
    - open: `allow()` is False until `reset_after_s` has passed since opening; results of calls that
      started before the breaker opened are ignored (they neither extend nor end the open period).
    - half-open: exactly one probe is allowed; its success closes the breaker, its failure re-opens it
      for another `reset_after_s`. A probe that never reports (its caller died) is given up after
      `reset_after_s`, and the next `allow()` becomes the new probe.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_after_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "llm",
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_after_s <= 0:
            raise ValueError("reset_after_s must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None  # set while a half-open probe is in flight
        self._times_opened = 0
        self._rejected = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an expired open period reads as half-open."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_after_s:
                return BreakerState.HALF_OPEN
            return self._state

    def stats(self) -> BreakerStats:
        state = self.state
        with self._lock:
            return BreakerStats(state, self._failures, self._times_opened, self._rejected)

    def allow(self) -> bool:
        """May a call go ahead now? In half-open, True for exactly one caller (the probe)."""
        with self._lock:
            now = self._clock()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if now - self._opened_at < self.reset_after_s:
                    self._rejected += 1
                    return False
                self._state = BreakerState.HALF_OPEN
                self._probe_started = None
                log.info("circuit half-open", extra={"breaker": self.name})
            # half-open
            if self._probe_started is None or now - self._probe_started >= self.reset_after_s:
                self._probe_started = now
                return True
            self._rejected += 1
            return False

    def record_success(self) -> None:
        with self._lock:
            if self._state is BreakerState.OPEN:
                return
            if self._state is BreakerState.HALF_OPEN:
                log.info("circuit closed", extra={"breaker": self.name})
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_started = None

    def record_failure(self) -> None:
        with self._lock:
            if self._state is BreakerState.OPEN:
                return
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._open()

    def release_probe(self) -> None:
        """Give up a half-open probe without a verdict (the call was cancelled), so another may probe."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._probe_started = None

    @contextmanager
    def guard(self, *, failures: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
        """Run the body if allowed, else raise LLMUnavailable("breaker_open").

        An exception of a `failures` type records a failure; any other `Exception` means the dependency
        answered (e.g. with unparsable output) and records a success; cancellation releases the probe.
        """
        if not self.allow():
            raise LLMUnavailable("breaker_open")
        try:
            yield
        except failures:
            self.record_failure()
            raise
        except Exception:
            self.record_success()
            raise
        except BaseException:
            self.release_probe()
            raise
        else:
            self.record_success()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_started = None
        self._times_opened += 1
        log.warning(
            "circuit opened",
            extra={"breaker": self.name, "consecutive_failures": self._failures, "reset_after_s": self.reset_after_s},
        )


class ConcurrencyLimiter:
    """At most `max_in_flight` holders; `try_acquire()` never waits, so excess requests go elsewhere."""

    def __init__(self, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._in_flight = 0
        self._rejected = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def rejected(self) -> int:
        """try_acquire() calls answered False, for metrics."""
        return self._rejected

    def try_acquire(self) -> bool:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                self._rejected += 1
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError("release() without a matching try_acquire()")
            self._in_flight -= 1

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """`with limiter.slot() as ok:` — ok is False when full; released on exit only if acquired."""
        acquired = self.try_acquire()
        try:
            yield acquired
        finally:
            if acquired:
                self.release()
