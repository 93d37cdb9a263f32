"""The app factory. `create_app(settings)` builds nothing at import time; tests pass their own services."""
from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from kernel.types import RequestContext
from selection.services import Services, build_services
from kernel.settings import Settings
from kernel.types import Decision, SelectRequest
from server.errors import install_error_handlers
from server.guard import Guard, arrival
from server.limits import InFlightGate, TokenBuckets
from server.metrics import Metrics
from server.protocol import (
    AdOut,
    CopyOut,
    ErrorResponse,
    HealthResponse,
    PromptOut,
    RequestContextBody,
    SelectRequestBody,
    SelectResponseBody,
)
from server.security import ApiKeys

log = logging.getLogger(__name__)
AUDIT_LOGGER = "adselect.audit"  # the pipeline's audit sink (selection.services.audit_logger) writes here


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServicesDep = Annotated[Services, Depends(get_services)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


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
    )


def create_app(settings: Settings, *, services: Services | None = None, llm_url: str | None = None) -> FastAPI:
    """`services` given: use them as they are (tests). Else build them at start-up; with no LLM URL in
    settings (and the LLM enabled), start the bundled local model and stop it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        local = None
        if services is not None:
            app.state.services = services
            app.state.llm_url = llm_url
        else:
            url = llm_url or settings.llm_url
            if url is None and settings.llm_enabled:
                from agent.local_server import LocalLLMServer

                local = LocalLLMServer.from_settings(settings).start()
                url = local.base_url
                log.info("started bundled local LLM at %s", url)
            effective = settings
            if local is not None:  # the bundled 135M CPU model reads prompts slowly: send it fewer candidates
                effective = settings.model_copy(update={"llm_max_candidates": settings.llm_candidates(bundled_model=True)})
            app.state.services = build_services(effective, llm_url=url)
            app.state.llm_url = url
            # What was just built (models, catalog, Chroma) lives as long as the process: out of the cyclic
            # collector's reach, a full collection under load scans only per-request objects. Measured with
            # bench/bench_load.py: shed-answer p99 217 ms -> 9 ms (the tail was gen-2 collections).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if local is not None:
                local.stop()

    app = FastAPI(
        title="adselect",
        version="0.1.0",
        description="Chooses the ad for an impression, explains why and rewrites its copy.",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse, "description": "Malformed request: a body that is not UTF-8 JSON, or input the core rejects."},
            401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are configured)."},
            413: {"model": ErrorResponse, "description": "Request body over the size limit."},
            422: {"model": ErrorResponse},
            429: {"model": ErrorResponse, "description": "Rate limit exceeded; see Retry-After."},
            500: {"model": ErrorResponse},
            503: {"model": ErrorResponse, "description": "Overloaded (shed) or a dependency is unavailable."},
        },
    )
    app.state.settings = settings
    _audit = logging.getLogger(AUDIT_LOGGER)
    if _audit.level == logging.NOTSET:  # audit lines are INFO records: never filtered out by a WARNING root
        _audit.setLevel(logging.INFO)
    if services is not None:  # usable before (or without) the lifespan, e.g. by in-process test clients
        app.state.services, app.state.llm_url = services, llm_url
    install_error_handlers(app)
    keys = ApiKeys(settings.api_keys)
    gate = InFlightGate(settings.max_inflight) if settings.max_inflight > 0 else None
    metrics = Metrics(services=lambda: getattr(app.state, "services", None), inflight=lambda: gate.in_flight if gate else 0)
    app.state.metrics = metrics
    app.add_middleware(
        Guard,
        keys=keys,
        metrics=metrics,
        routes=lambda: frozenset(getattr(r, "path", "") for r in app.routes),
        max_body_bytes=settings.max_body_bytes,
        buckets=TokenBuckets(rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst) if settings.rate_limit_per_s > 0 else None,
        gate=gate,
    )
    _document_auth(app, enabled=keys.enabled)

    @app.post("/v1/select", response_model=SelectResponseBody, response_model_by_alias=True)
    async def select(body: SelectRequestBody, request: Request, svc: ServicesDep, metrics: MetricsDep) -> SelectResponseBody:
        since = arrival(request.scope)
        spent_ms = (time.perf_counter() - since) * 1000 if since is not None else 0.0
        decision = await svc.selector.aselect(to_core(body, svc.settings, spent_ms=spent_ms))
        metrics.observe_decision(decision)
        return to_wire(decision)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(request: Request, svc: ServicesDep) -> HealthResponse:
        url = request.app.state.llm_url
        return HealthResponse(status="ok", ads=len(svc.index), llm=url if (url and svc.selector.reranker) else "off")

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."}},
    )
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        """Prometheus metrics (behind the API key when keys are configured)."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return app


def _document_auth(app: FastAPI, *, enabled: bool) -> None:
    """Describe the API key schemes in OpenAPI; mark every operation as needing one when keys are set."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            schema.setdefault("components", {})["securitySchemes"] = {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerKey": {"type": "http", "scheme": "bearer"},
            }
            if enabled:
                for path, ops in schema.get("paths", {}).items():
                    if path != "/healthz":
                        for op in ops.values():
                            op["security"] = [{"ApiKeyHeader": []}, {"BearerKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
