"""Request limits that answer at once instead of queueing: rate (429), load (503), body size (413) and
body read time (408).

- `TokenBuckets`: one bucket per caller (API key id, or client IP when auth is off); `rate` tokens a
  second up to `burst`; a request spends one token or is refused with the seconds until the next one.
  At most `max_callers` buckets are kept (least recently used dropped: a dropped caller starts full).
- `InFlightGate`: at most `limit` requests inside; `try_enter()` never waits.
- `read_body()`: the whole request body, or `BodyTooLarge` as soon as the declared Content-Length or
  the bytes actually received pass the limit (a chunked body has no Content-Length to trust). The caller
  bounds the time it may take (the guard's body read timeout).
- `drain()`: reads and drops the rest of a refused body, at most `limit` bytes, so that a client that sends
  its whole body before reading (Python's urllib, most plain clients) reads the 413 instead of a reset
  connection: closing a socket with unread bytes in its receive buffer makes the kernel send a TCP RST.
- `Tally`: how many of something are in progress (bodies being read), for a gauge.

All three run on the server's event loop (one thread), so they hold no locks.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
