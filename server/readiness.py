"""/readyz: can this process serve traffic now? Each dependency is checked on its own, concurrently, each
within `timeout_s`; /healthz (liveness) checks nothing.

    chroma   required   the catalog store answers (collection count)
    caps     required   the frequency-cap store answers (a count for a user no caller can be); "off" when
                        the service runs without caps (offline replay)
    llm      optional   the OpenAI-compatible server lists its models (GET {llm_url}/models); "off" when
                        the service has no LLM stage. Down = the service answers from the priors (every
                        LLM-asked decision says `degraded`), so /readyz answers 200 with status "degraded":
                        taking the instance out of rotation would not bring the LLM back, and the fast path
                        still serves.

503 when a required check is down. No check reports an exception's text (it may hold a path or a URL);
only its type name.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from server.protocol import CheckOut, CheckStatus, ReadyResponse, ReadyStatus

CAPS_PROBE_USER = "\x00readyz"  # no user key can be this: user keys are hex digests


async def _timed(fn: Callable[[], Awaitable[Any]], *, timeout_s: float) -> CheckOut:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await fn()
    except TimeoutError:
        return CheckOut(status=CheckStatus.DOWN, error="timeout", ms=_ms(started))
    except Exception as e:  # any failure of a dependency is "down"; its type says which
        return CheckOut(status=CheckStatus.DOWN, error=type(e).__name__, ms=_ms(started))
    return CheckOut(status=CheckStatus.UP, ms=_ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def check_chroma(store: Any, *, timeout_s: float) -> CheckOut:
    return await _timed(lambda: asyncio.to_thread(store.count), timeout_s=timeout_s)


async def check_caps(caps: Any | None, *, timeout_s: float) -> CheckOut:
    if caps is None:
        return CheckOut(status=CheckStatus.OFF)
    return await _timed(lambda: asyncio.to_thread(caps.count, CAPS_PROBE_USER, ad_id=CAPS_PROBE_USER), timeout_s=timeout_s)


async def check_llm(url: str | None, *, enabled: bool, api_key: str, timeout_s: float, breaker: Any | None = None) -> CheckOut:
    if not enabled:
        return CheckOut(status=CheckStatus.OFF)
    state = breaker.stats().state.value if breaker is not None else None
    if url is None:  # an injected LLM stage with no server to ask: only the breaker can tell
        status = CheckStatus.DOWN if state == "open" else CheckStatus.UNCHECKED
        return CheckOut(status=status, breaker=state)

    async def models() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(f"{url.rstrip('/')}/models", headers={"Authorization": f"Bearer {api_key}"})
            r.raise_for_status()

    out = await _timed(models, timeout_s=timeout_s)
    return out.model_copy(update={"breaker": state})


async def readiness(
    *, store: Any, caps: Any | None, llm_url: str | None, llm_enabled: bool, llm_api_key: str, breaker: Any | None, timeout_s: float
) -> ReadyResponse:
    chroma, cap, llm = await asyncio.gather(
        check_chroma(store, timeout_s=timeout_s),
        check_caps(caps, timeout_s=timeout_s),
        check_llm(llm_url, enabled=llm_enabled, api_key=llm_api_key, timeout_s=timeout_s, breaker=breaker),
    )
    if CheckStatus.DOWN in (chroma.status, cap.status):
        status = ReadyStatus.UNREADY
    elif llm.status == CheckStatus.DOWN:
        status = ReadyStatus.DEGRADED
    else:
        status = ReadyStatus.READY
    return ReadyResponse(status=status, checks={"chroma": chroma, "caps": cap, "llm": llm})
