"""The app factory. `create_app(settings)` builds nothing at import time; tests pass their own services."""
from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from adselect.services import Services, build_services
from adselect.settings import Settings
from adselect.types import Decision, SelectRequest
from server.errors import install_error_handlers
from server.protocol import (
    AdOut,
    CopyOut,
    ErrorResponse,
    HealthResponse,
    PromptOut,
    SelectRequestBody,
    SelectResponseBody,
)

log = logging.getLogger(__name__)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def to_core(body: SelectRequestBody, settings: Settings) -> SelectRequest:
    deadline = body.deadline_ms if body.deadline_ms is not None else settings.default_deadline_ms
    return SelectRequest(
        user_id=body.user_id,
        history=list(body.history),
        events=list(body.events),
        candidates=list(body.candidates) if body.candidates is not None else None,
        k=body.k,
        deadline_ms=min(deadline, settings.max_deadline_ms),
        use_llm=body.use_llm,
        rewrite=body.rewrite,
        request_id=uuid.uuid4().hex,
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
            app.state.services = build_services(settings, llm_url=url)
            app.state.llm_url = url
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
        responses={422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.settings = settings
    install_error_handlers(app)

    @app.post("/v1/select", response_model=SelectResponseBody, response_model_by_alias=True)
    async def select(body: SelectRequestBody, svc: ServicesDep) -> SelectResponseBody:
        decision = await svc.selector.aselect(to_core(body, svc.settings))
        return to_wire(decision)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(request: Request, svc: ServicesDep) -> HealthResponse:
        url = request.app.state.llm_url
        return HealthResponse(status="ok", ads=len(svc.index), llm=url if (url and svc.selector.reranker) else "off")

    return app
