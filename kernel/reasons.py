"""Why a decision was degraded: one vocabulary for the pipeline, the wire schema, metrics and eval reports.

`degradation_for(exc)` is the one place an LLM-stage exception becomes a reason, by type, never by text.
"""
from __future__ import annotations

import asyncio
from enum import StrEnum

from kernel.errors import LLMOutputInvalid, LLMUnavailable


class DegradedReason(StrEnum):
    """`degraded_reason` of a decision: the service answered, but without part of what was asked."""

    LLM_DISABLED = "llm_disabled"  # the request asked for the LLM; this service has no LLM stage
    DEADLINE_EXHAUSTED = "deadline_exhausted"  # no time left for an LLM call after the priors
    LLM_BUSY = "llm_busy"  # every LLM slot was taken: the fast path answered at once
    LLM_BREAKER_OPEN = "llm_breaker_open"  # the circuit breaker is open after repeated failures
    LLM_TIMEOUT = "llm_timeout"  # the LLM did not answer within the request's budget
    LLM_CONNECTION = "llm_connection"  # the LLM server could not be reached
    LLM_HTTP_ERROR = "llm_http_error"  # the LLM server answered with an HTTP error status
    LLM_INVALID_OUTPUT = "llm_invalid_output"  # the LLM answered, but not with valid output
    LLM_ERROR = "llm_error"  # any other failure of the LLM stage (unmapped client error, bug)


# Reasons that say the LLM is unavailable (they count against the circuit breaker). Invalid output is the
# model's quality, not its availability.
AVAILABILITY_FAILURES = frozenset(
    {DegradedReason.LLM_TIMEOUT, DegradedReason.LLM_CONNECTION, DegradedReason.LLM_HTTP_ERROR, DegradedReason.LLM_ERROR}
)
# Reasons that come from a call that was made and failed (metrics count them as LLM errors).
CALL_FAILURES = AVAILABILITY_FAILURES | {DegradedReason.LLM_INVALID_OUTPUT}

_UNAVAILABLE = {
    "timeout": DegradedReason.LLM_TIMEOUT,
    "connection": DegradedReason.LLM_CONNECTION,
    "http_error": DegradedReason.LLM_HTTP_ERROR,
    "breaker_open": DegradedReason.LLM_BREAKER_OPEN,
    "busy": DegradedReason.LLM_BUSY,
}


def degradation_for(exc: BaseException) -> DegradedReason:
    """The reason an LLM-stage exception degrades a decision to."""
    if isinstance(exc, LLMUnavailable):
        return _UNAVAILABLE.get(exc.reason, DegradedReason.LLM_ERROR)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return DegradedReason.LLM_TIMEOUT
    if isinstance(exc, LLMOutputInvalid):
        return DegradedReason.LLM_INVALID_OUTPUT
    return DegradedReason.LLM_ERROR
