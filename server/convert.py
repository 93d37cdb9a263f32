"""Wire ⇄ core: a request body becomes the core's SelectRequest, a Decision becomes the response body.

The endpoint and the CLI's `select` both go through these, so they print the same JSON.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from kernel.settings import Settings
from kernel.types import Decision, RequestContext, SelectRequest
from server.protocol import AdOut, CopyOut, PromptOut, RequestContextBody, SelectRequestBody, SelectResponseBody


def to_context(body: RequestContextBody | None, now: datetime) -> RequestContext:
    if body is None:
        return RequestContext(now=now)
    return RequestContext(
        now=now,
        locale=body.locale,
        device=body.device,
        publisher_id=body.publisher_id,
        blocked_categories=frozenset(body.blocked_categories),
        blocked_advertisers=frozenset(body.blocked_advertisers),
        consent=body.consent,
    )


def to_core(body: SelectRequestBody, settings: Settings, *, spent_ms: float = 0.0) -> SelectRequest:
    """`spent_ms`: time the request already spent in the server (reading, queueing), taken off its deadline."""
    deadline = body.deadline_ms if body.deadline_ms is not None else settings.default_deadline_ms
    deadline = max(1, int(min(deadline, settings.max_deadline_ms) - spent_ms))
    return SelectRequest(
        user_id=body.user_id,
        history=list(body.history),
        events=list(body.events),
        candidates=list(body.candidates) if body.candidates is not None else None,
        k=body.k,
        deadline_ms=deadline,
        use_llm=body.use_llm,
        rewrite=body.rewrite,
        request_id=uuid.uuid4().hex,
        context=to_context(body.context, datetime.now(timezone.utc)),
        impression_id=body.impression_id or "",
    )


def to_wire(d: Decision) -> SelectResponseBody:
    return SelectResponseBody(
        request_id=d.request_id,
        ads=[
            AdOut(
                ad_id=a.ad.ad_id,
                title=a.ad.title,
                advertiser=a.ad.advertiser,
                score=a.score,
                priors=a.priors,
                llm_rank=a.llm_rank,
                justification=a.justification,
                pctr=a.pctr,
                expected_value=a.expected_value,
                copy=CopyOut(headline=a.copy.headline, description=a.copy.description),
                original=CopyOut(headline=a.original.headline, description=a.original.description),
                propensity=a.propensity,
            )
            for a in d.ads
        ],
        llm_used=d.llm_used,
        degraded=d.degraded,
        degraded_reason=d.degraded_reason,
        prompt=PromptOut(**d.prompt) if d.prompt else None,
        model=d.model,
        timings_ms=d.timings_ms,
        unknown_ids=d.unknown_ids,
        caps_unknown=d.caps_unknown,
        arm=d.arm,
        personalized=d.personalized,
        versions=d.versions,
    )
