"""The app factory. `create_app(settings)` builds nothing at import time; tests pass their own services."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from selection.services import Services, build_services, reload_services
from kernel.settings import Settings
from server.errors import install_error_handlers
from server.guard import PUBLIC_PATHS, Guard, arrival
from server.limits import InFlightGate, Tally, rate_limiter
from server.metrics import Metrics
from server.readiness import readiness
from server.reload_group import POLL_S, WAIT_S, ReloadGroup
from server.convert import to_core, to_wire
from server.loop_metrics import LoopState
from server.protocol import (
    ErrorResponse,
    EventBody,
    EventResponse,
    HealthResponse,
    ReadyResponse,
    ReadyStatus,
    ReloadResponse,
    SelectRequestBody,
    SelectResponseBody,
)
from kernel.errors import RuntimeFault
from server.security import ApiKeys

log = logging.getLogger(__name__)
AUDIT_LOGGER = "adselect.audit"  # the pipeline's audit sink (selection.services.audit_logger) writes here


async def get_services(request: Request) -> Services:
    """This worker's services, caught up first with a reload another worker of the group made (server.reload_group)."""
    catch_up = getattr(request.app.state, "catch_up", None)
    if catch_up is not None:
        await catch_up(request.app)
    return request.app.state.services


async def get_metrics(request: Request) -> Metrics:
    """async, like every dependency here: FastAPI runs a plain `def` dependency on its thread pool (a thread
    hop on every request that uses it)."""
    return request.app.state.metrics


ServicesDep = Annotated[Services, Depends(get_services)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


class FeedbackOff(RuntimeFault):
    """This service was built without a feedback store (offline services)."""

    code = "feedback_unavailable"
    public = "this service does not take feedback events"


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    llm_url: str | None = None,
    reload_on_sighup: bool = False,
    group: ReloadGroup | None = None,
) -> FastAPI:
    """`services` given: use them as they are (tests). Else build them at start-up; with no LLM URL in
    settings (and the LLM enabled), start the bundled local model and stop it at shutdown.
    `reload_on_sighup`: SIGHUP reloads weights, behaviour tables, experiment and prompts (`adselect serve`).
    `group`: this process is one worker of `serve --workers N`; a reload reaches every worker (server.reload_group)."""
    reload_lock = asyncio.Lock()

    async def do_reload(app: FastAPI) -> Services:
        async with reload_lock:  # one reload at a time; requests keep being served by the old services meanwhile
            new = await asyncio.to_thread(reload_services, app.state.services)  # ReloadRefused: nothing changes anywhere
            app.state.services = new
            if group is not None:  # every file checked out here: the other workers follow
                await asyncio.to_thread(group.bump)
                group.report(versions=new.versions)
            return new

    async def catch_up(app: FastAPI) -> None:
        """Another worker of the group reloaded: reload from the same files before serving on."""
        if group is None or not group.changed():
            return
        async with reload_lock:
            target = group.current()
            if target <= group.tried:
                return
            group.tried = target
            try:
                new = await asyncio.to_thread(reload_services, app.state.services)
            except Exception as e:  # refused here (a file changed since): the previous version keeps serving
                log.exception("reload of generation %d refused in this worker: the previous version keeps serving", target)
                group.report(versions=app.state.services.versions, error=f"{type(e).__name__}: {e}")
                return
            app.state.services = new
            group.generation = target
            group.report(versions=new.versions)

    async def poll(app: FastAPI) -> None:
        while True:  # an idle worker switches within POLL_S too, so the reload call can report every worker
            await asyncio.sleep(POLL_S)
            try:
                await catch_up(app)
            except Exception:
                log.exception("reload generation check failed")

    def on_sighup(app: FastAPI) -> None:
        async def run() -> None:
            try:
                await do_reload(app)
            except Exception:
                log.exception("SIGHUP reload refused: the previous version keeps serving")

        asyncio.get_running_loop().create_task(run())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        local = None
        built = False
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
            built = True
            # What was just built (models, catalog, Chroma) lives as long as the process: out of the cyclic
            # collector's reach, a full collection under load scans only per-request objects. Measured with
            # bench/bench_load.py: shed-answer p99 217 ms -> 9 ms (the tail was gen-2 collections).
            gc.collect()
            gc.freeze()
        if reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup, app)
        poller = None
        if group is not None:  # built from the files on disk now: that is the group's current generation
            group.generation = group.tried = group.current()
            group.report(versions=app.state.services.versions)
            app.state.catch_up = catch_up
            poller = asyncio.get_running_loop().create_task(poll(app))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                group.leave()  # type: ignore[union-attr]
            if reload_on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if built:
                app.state.services.close()  # drain the impression log and the served rows
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
            408: {"model": ErrorResponse, "description": "Request body not received within the body read timeout."},
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
    reading = Tally()
    metrics = Metrics(
        services=lambda: getattr(app.state, "services", None), inflight=lambda: gate.in_flight if gate else 0, reading=lambda: reading.n
    )
    app.state.metrics = metrics
    metrics.registry.register(LoopState(lambda: getattr(app.state, "services", None)))
    app.add_middleware(
        Guard,
        keys=keys,
        metrics=metrics,
        routes=lambda: frozenset(getattr(r, "path", "") for r in app.routes),
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
        max_drain_bytes=settings.max_drain_bytes,
        reading=reading,
        buckets=rate_limiter(settings),
        gate=gate,
    )
    _document_auth(app, enabled=keys.enabled)

    @app.post("/v1/select", response_model=SelectResponseBody, response_model_by_alias=True)
    async def select(body: SelectRequestBody, request: Request) -> Response:
        # The services and metrics read here, not through Depends: each dependency FastAPI solves costs every request.
        svc, metrics = await get_services(request), request.app.state.metrics
        since = arrival(request.scope)
        spent_ms = (time.perf_counter() - since) * 1000 if since is not None else 0.0
        decision = await svc.selector.aselect(to_core(body, svc.settings, spent_ms=spent_ms), fast_path_on_loop=svc.settings.fast_path_on_loop)
        metrics.observe_decision(decision)
        # Serialised by pydantic-core straight to bytes: FastAPI would validate the model again first.
        return Response(content=to_wire(decision).model_dump_json(by_alias=True), media_type="application/json")

    @app.post(
        "/v1/events",
        response_model=EventResponse,
        responses={404: {"model": ErrorResponse, "description": "Unknown request_id (or older than the feedback window)."},
                   409: {"model": ErrorResponse, "description": "event_id already recorded with a different payload."}},
    )  # fmt: skip
    async def events(body: EventBody, svc: ServicesDep) -> EventResponse:
        """Report that a served ad was rendered, clicked or converted. Idempotent by event_id: a retry answers
        200 again and is not counted twice. 400 when the request did not serve that ad."""
        if svc.served is None:
            raise FeedbackOff("no feedback store")
        status = await asyncio.to_thread(
            svc.served.record_event, event_id=body.event_id, request_id=body.request_id, ad_id=body.ad_id, type=body.type, value=body.value
        )
        return EventResponse(status=status)

    @app.post("/admin/reload", response_model=ReloadResponse)
    async def admin_reload(request: Request) -> ReloadResponse:
        """Reload weights (and calibration), behaviour tables, experiment and prompts without a restart. A bad
        file is refused (400 reload_refused) and the previous version keeps serving. Under `serve --workers N`
        every worker follows before its next request; the answer comes once all have switched (at most
        server.reload_group.WAIT_S) and lists each worker's versions."""
        new = await do_reload(request.app)
        if group is None:
            return ReloadResponse(status="reloaded", versions=new.versions)
        generation = group.generation
        deadline = time.monotonic() + WAIT_S
        while (pending := await asyncio.to_thread(group.pending, generation)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        workers = await asyncio.to_thread(group.workers)
        return ReloadResponse(status="reloaded", versions=new.versions, generation=generation, workers=workers, pending=pending)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(svc: ServicesDep) -> HealthResponse:
        """Liveness: the process answers (public, checks nothing). Readiness is /readyz."""
        return HealthResponse(status="ok", ads=len(svc.index))

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "A required dependency (chroma, caps) is down."}},
    )
    async def readyz(request: Request, svc: ServicesDep) -> JSONResponse:
        """Readiness: Chroma, the cap store and the LLM, each checked and reported on its own (behind the API key
        when keys are configured, like every route but /healthz). 503 when Chroma or the cap store is down; the LLM
        down answers 200 with status "degraded" (the fast path still serves)."""
        sel = svc.selector
        ready = await readiness(
            store=svc.store,
            caps=getattr(sel, "caps", None),
            llm_url=request.app.state.llm_url,
            llm_enabled=sel.reranker is not None,
            llm_api_key=svc.settings.llm_api_key,
            breaker=getattr(sel, "breaker", None),
            timeout_s=svc.settings.readiness_timeout_s,
        )
        status = 503 if ready.status == ReadyStatus.UNREADY else 200
        return JSONResponse(status_code=status, content=ready.model_dump(mode="json"))

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
                    if path not in PUBLIC_PATHS:
                        for op in ops.values():
                            op["security"] = [{"ApiKeyHeader": []}, {"BearerKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
