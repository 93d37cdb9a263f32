"""The one ASGI middleware in front of the app: auth, rate limit, body limits, load shedding, request metrics.

Order per request (each refusal is the one error shape, answered before any work is done):

    metrics (every request: route, status, latency)
      └ auth          401  unless the path is public (/healthz) or no keys are configured
        └ rate limit  429  /v1/* only; per key id (per client IP without auth); in memory, or in Redis (server/limits.py)
          └ body      413  Content-Length over the limit, or more bytes streamed than the limit
                      408  the whole body not in within `body_read_timeout_s` of arrival
            └ shed    503  /v1/select only, when `max_inflight` are already in progress
              └ app        with the body already read (replayed to it)

The in-flight slot is taken only once the body is in: a slow client holds a socket and a coroutine,
never a slot, so a few dozen of them cannot make the server shed everyone else. A refused oversized
body is drained (at most `max_drain_bytes`, within the same read timeout) before the 413 is sent, so a
client that writes its whole body before reading reads the 413 and not a reset connection.

Nothing here reads a body's content or logs it; callers are named by key id or IP only.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.limits import BodyTooLarge, ClientGone, InFlightGate, RateLimiter, Tally, TokenBuckets, declared_length, drain, read_body, replay
from server.metrics import (
    REFUSED_BODY_TIMEOUT,
    REFUSED_BODY_TOO_LARGE,
    REFUSED_RATE_LIMITED,
    REFUSED_SHED,
    REFUSED_UNAUTHORIZED,
    Metrics,
)
from server.security import ApiKeys

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz"})
SELECT_PATH = "/v1/select"
RATE_LIMITED_PREFIX = "/v1/"
ARRIVAL_KEY = "adselect.arrival"  # scope["state"] key: perf_counter() when the request reached the server
CLIENT_GONE_STATUS = 499  # for metrics only: nothing is sent


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        metrics: Metrics,
        routes: Callable[[], frozenset[str]],
        max_body_bytes: int,
        body_read_timeout_s: float,
        max_drain_bytes: int,
        buckets: RateLimiter | None,
        gate: InFlightGate | None,
        reading: Tally | None = None,
    ):
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self._routes = routes
        self._known: frozenset[str] | None = None
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.max_drain_bytes = max_drain_bytes
        self.buckets = buckets
        self.gate = gate
        self.reading = reading or Tally()

    def _route(self, path: str) -> str:
        if self._known is None:
            self._known = self._routes()
        return path if path in self._known else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})[ARRIVAL_KEY] = started
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        except ClientGone:
            status["code"] = CLIENT_GONE_STATUS
        finally:
            self.metrics.observe_request(
                route=self._route(scope["path"]), method=scope["method"], status=status["code"], seconds=time.perf_counter() - started
            )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, reason: str, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.metrics.observe_refusal(reason)
        await error_response(status, code, message, headers=headers)(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        headers = Headers(scope=scope)
        caller: str | None = None
        if self.keys.enabled and path not in PUBLIC_PATHS:
            caller = self.keys.identify(headers)
            if caller is None:
                await self._refuse(
                    scope, receive, send, reason=REFUSED_UNAUTHORIZED, status=401, code="unauthorized",
                    message="missing or invalid API key (X-API-Key or Authorization: Bearer)",
                    headers={"WWW-Authenticate": 'Bearer realm="adselect"'},
                )  # fmt: skip
                return
        if self.buckets is not None and path.startswith(RATE_LIMITED_PREFIX):
            if caller is None:
                client = scope.get("client")
                caller = f"ip:{client[0]}" if client else "ip:unknown"
            wait = self.buckets.take(caller)
            if wait > 0:
                await self._refuse(
                    scope, receive, send, reason=REFUSED_RATE_LIMITED, status=429, code="rate_limited",
                    message="rate limit exceeded", headers={"Retry-After": TokenBuckets.retry_after(wait)},
                )  # fmt: skip
                return
        body = await self._read_body(scope, receive, send, headers)
        if body is None:
            return
        gate = self.gate if path == SELECT_PATH else None
        if gate is not None and not gate.try_enter():
            await self._refuse(
                scope, receive, send, reason=REFUSED_SHED, status=503, code="overloaded",
                message="server busy: too many requests in progress", headers={"Retry-After": "1"},
            )  # fmt: skip
            return
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            if gate is not None:
                gate.leave()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> bytes | None:
        """The whole body, or None once a 413 or 408 has been sent. Raises ClientGone."""
        declared = declared_length(headers)
        arrived = arrival(scope) or time.perf_counter()

        def left_s() -> float:
            return max(0.0, self.body_read_timeout_s - (time.perf_counter() - arrived))

        with self.reading.held():
            try:
                async with asyncio.timeout(left_s()):
                    return await read_body(receive, limit=self.max_body_bytes, declared=declared)
            except BodyTooLarge as e:
                too_large = e
            except TimeoutError:
                await self._refuse(
                    scope, receive, send, reason=REFUSED_BODY_TIMEOUT, status=408, code="body_timeout",
                    message=f"request body not received within {self.body_read_timeout_s:g} s", headers={"Connection": "close"},
                )  # fmt: skip
                return None
            if not too_large.ended and (declared is None or declared <= self.max_body_bytes + self.max_drain_bytes):
                try:
                    async with asyncio.timeout(left_s()):
                        await drain(receive, limit=self.max_drain_bytes)
                except TimeoutError:
                    pass  # answer anyway: the drain is a courtesy, bounded in bytes and time
        await self._refuse(
            scope, receive, send, reason=REFUSED_BODY_TOO_LARGE, status=413, code="body_too_large",
            message=f"request body larger than {too_large.limit} bytes", headers={"Connection": "close"},
        )  # fmt: skip
        return None


def arrival(scope: dict[str, Any]) -> float | None:
    """When the guard first saw this request (perf_counter), if it did."""
    return scope.get("state", {}).get(ARRIVAL_KEY)
