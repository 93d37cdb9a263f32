"""Circuit breaker and concurrency limiter, driven by a fake clock."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernel.errors import LLMOutputInvalid, LLMUnavailable
from agent.breaker import BreakerState, CircuitBreaker, ConcurrencyLimiter


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(3, 10.0, clock=clock)


def fail(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        assert b.allow()
        b.record_failure()


def test_opens_after_n_consecutive_failures(breaker):
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.stats().times_opened == 1 and breaker.stats().rejected == 1


def test_success_resets_the_count(breaker):
    fail(breaker, 2)
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe(breaker, clock):
    fail(breaker, 3)
    clock.advance(9.99)
    assert not breaker.allow()
    clock.advance(0.01)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert [breaker.allow() for _ in range(5)] == [False] * 5


def test_probe_success_closes(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(5))
    assert breaker.stats().consecutive_failures == 0


def test_probe_failure_reopens_for_another_period(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(9)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert breaker.stats().times_opened == 2


def test_late_results_while_open_are_ignored(breaker, clock):
    fail(breaker, 3)
    breaker.record_success()  # a call that started before the breaker opened
    assert breaker.state is BreakerState.OPEN
    clock.advance(5)
    breaker.record_failure()  # must not extend the open period
    clock.advance(5)
    assert breaker.allow()


def test_lost_probe_is_replaced_after_reset_period(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()  # this probe never reports back
    clock.advance(5)
    assert not breaker.allow()
    clock.advance(5)
    assert breaker.allow()


def test_release_probe_lets_another_probe(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    assert breaker.allow()
    breaker.release_probe()
    assert breaker.allow()


def test_guard(breaker, clock):
    for _ in range(3):
        with pytest.raises(LLMUnavailable), breaker.guard(failures=(LLMUnavailable,)):
            raise LLMUnavailable("timeout")
    with pytest.raises(LLMUnavailable) as exc, breaker.guard():
        pytest.fail("body must not run while open")
    assert exc.value.reason == "breaker_open"
    clock.advance(10)
    with pytest.raises(LLMOutputInvalid), breaker.guard(failures=(LLMUnavailable,)):
        raise LLMOutputInvalid("bad_json")  # the LLM answered: counts as the service being up
    assert breaker.state is BreakerState.CLOSED
    with breaker.guard():
        pass
    assert breaker.state is BreakerState.CLOSED


def test_guard_releases_probe_on_cancellation(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    with pytest.raises(KeyboardInterrupt), breaker.guard():
        raise KeyboardInterrupt
    assert breaker.allow(), "a cancelled probe must not block the next one"


def test_state_gauge_values():
    assert [s.gauge for s in BreakerState] == [0, 2, 1]
    assert BreakerState.HALF_OPEN == "half_open"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0)
    with pytest.raises(ValueError):
        ConcurrencyLimiter(0)


def test_half_open_probe_is_unique_under_threads(breaker, clock):
    fail(breaker, 3)
    clock.advance(10)
    barrier = threading.Barrier(32)

    def ask(_: int) -> bool:
        barrier.wait()
        return breaker.allow()

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert sum(pool.map(ask, range(32))) == 1


def test_threshold_counts_failures_from_many_threads(clock):
    b = CircuitBreaker(100, 10.0, clock=clock)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: b.record_failure(), range(99)))
    assert b.state is BreakerState.CLOSED and b.stats().consecutive_failures == 99
    b.record_failure()
    assert b.state is BreakerState.OPEN


# --- ConcurrencyLimiter ---------------------------------------------------------------------------


def test_limiter_refuses_without_waiting():
    lim = ConcurrencyLimiter(2)
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.try_acquire()
    assert lim.in_flight == 2 and lim.rejected == 1
    lim.release()
    assert lim.try_acquire()


def test_limiter_release_without_acquire_is_an_error():
    with pytest.raises(RuntimeError):
        ConcurrencyLimiter(1).release()


def test_limiter_slot_context_manager():
    lim = ConcurrencyLimiter(1)
    with lim.slot() as first:
        assert first
        with lim.slot() as second:
            assert not second
        assert lim.in_flight == 1
    assert lim.in_flight == 0
    with pytest.raises(ZeroDivisionError), lim.slot():
        1 / 0
    assert lim.in_flight == 0


def test_limiter_never_exceeds_max_and_refusals_do_not_wait():
    lim = ConcurrencyLimiter(4)
    peak = 0
    peak_lock = threading.Lock()
    barrier = threading.Barrier(50)
    hold = threading.Event()

    def request(_: int) -> bool:
        nonlocal peak
        barrier.wait()
        with lim.slot() as ok:
            if ok:
                with peak_lock:
                    peak = max(peak, lim.in_flight)
                hold.wait(10.0)
            return ok

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(request, i) for i in range(50)]
        # the 46 refused requests finish while the 4 holders are still inside their slots
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futures) < 46 and time.monotonic() < deadline:
            time.sleep(0.01)
        done = [f.result() for f in futures if f.done()]
        assert len(done) == 46 and not any(done)
        hold.set()
        results = [f.result() for f in futures]
    assert sum(results) == 4 and peak <= 4
    assert lim.in_flight == 0 and lim.rejected == 46
