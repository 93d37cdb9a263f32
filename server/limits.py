"""Request limits that answer at once instead of queueing: rate (429), load (503), body size (413) and
body read time (408).

- `TokenBuckets`: one bucket per caller (API key id, or client IP when auth is off); `rate` tokens a
  second up to `burst`; a request spends one token or is refused with the seconds until the next one.
  At most `max_callers` buckets are kept (least recently used dropped: a dropped caller starts full).
  In this process's memory: each worker and replica has its own.
- `SharedRateLimit`: the same `take()` over Redis, one limit for every worker and replica (the `limits`
  library's moving window: at most `burst` requests in any `window_s` = burst/rate seconds, whole seconds,
  at least 1). A Redis that fails or does not answer within its timeout lets the request through (rate
  limiting is protection, not safety; frequency caps are the safety and fail closed) and skips Redis for
  `skip_s`; `failures` counts it.
- `InFlightGate`: at most `limit` requests inside; `try_enter()` never waits.
- `read_body()`: the whole request body, or `BodyTooLarge` as soon as the declared Content-Length or
  the bytes actually received pass the limit (a chunked body has no Content-Length to trust). The caller
  bounds the time it may take (the guard's body read timeout).
- `drain()`: reads and drops the rest of a refused body, at most `limit` bytes, so that a client that sends
  its whole body before reading (Python's urllib, most plain clients) reads the 413 instead of a reset
  connection: closing a socket with unread bytes in its receive buffer makes the kernel send a TCP RST.
- `Tally`: how many of something are in progress (bodies being read), for a gauge.

All of them run on the server's event loop (one thread), so they hold no locks; `SharedRateLimit.take` makes one
blocking Redis round trip (bounded by its timeout).
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]


class TokenBuckets:
    def __init__(self, *, rate: float, burst: int, max_callers: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, at)

    def take(self, caller: str) -> float:
        """0.0 if a token was spent, else the seconds until one is available (nothing spent)."""
        now = self._clock()
        tokens, at = self._buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[caller] = (tokens, now)
        while len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """Retry-After header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_s)))


class RateLimiter(Protocol):
    def take(self, caller: str) -> float:
        """0.0 if the request may go, else the seconds until it may."""
        ...


class SharedRateLimit:
    """A moving-window rate limit in Redis shared by every process that names the same Redis (see the module doc)."""

    KEY_PREFIX = "adselect:rate"

    def __init__(
        self, *, redis_url: str, rate: float, burst: int, timeout_s: float, skip_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.window_s = max(1, round(burst / rate))
        self.item = RateLimitItemPerSecond(burst, self.window_s)
        # wrap_exceptions: every Redis failure surfaces as limits.errors.StorageError
        self.storage = RedisStorage(
            redis_url, key_prefix=self.KEY_PREFIX, wrap_exceptions=True,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        )  # fmt: skip
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.skip_s = skip_s
        self._clock = clock
        self._skip_until = 0.0
        self.failures = 0

    def take(self, caller: str) -> float:
        from limits.errors import StorageError

        if self._clock() < self._skip_until:
            return 0.0
        try:
            if self.limiter.hit(self.item, caller):
                return 0.0
            reset = self.limiter.get_window_stats(self.item, caller).reset_time
        except StorageError as e:
            self.failures += 1
            self._skip_until = self._clock() + self.skip_s
            log.warning("rate limit store unreachable: requests pass unlimited", extra={"error": type(e.__cause__ or e).__name__, "skip_s": self.skip_s})
            return 0.0
        return max(0.001, reset - time.time())


class InFlightGate:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


class Tally:
    """A count of things in progress, with no limit (e.g. request bodies being read)."""

    def __init__(self) -> None:
        self.n = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.n += 1
        try:
            yield
        finally:
            self.n -= 1


class BodyTooLarge(Exception):
    """`ended`: the last chunk of the body has been read (nothing left to drain)."""

    def __init__(self, limit: int, *, ended: bool = False):
        self.limit = limit
        self.ended = ended
        super().__init__(f"request body larger than {limit} bytes")


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


def declared_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def read_body(receive: Receive, *, limit: int, declared: int | None) -> bytes:
    """Read the body (at most `limit` bytes) before the app sees it; raises BodyTooLarge or ClientGone."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            raise BodyTooLarge(limit, ended=not more)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


async def drain(receive: Receive, *, limit: int) -> bool:
    """Read and drop the rest of a body, at most `limit` bytes; True if the body ended within that.

    Raises ClientGone if the client disconnects. The caller bounds the time it may take."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if size > limit:
            return False


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the app the already-read body once, then defers to the real one."""
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


def rate_limiter(settings) -> RateLimiter | None:
    """The /v1/* rate limit the settings ask for: none (rate 0), shared in Redis (redis_url set), else in memory."""
    if settings.rate_limit_per_s <= 0:
        return None
    if settings.redis_url:
        return SharedRateLimit(
            redis_url=settings.redis_url, rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst, timeout_s=settings.redis_timeout_s
        )
    return TokenBuckets(rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
