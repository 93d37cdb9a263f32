"""Wire models of the public API (their limits are the API's limits, documented in OpenAPI)."""
from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kernel.reasons import DegradedReason

AdId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
EventText = Annotated[str, StringConstraints(min_length=1, max_length=500)]

MAX_HISTORY = 200
MAX_EVENTS = 20
MAX_CANDIDATES = 200
MAX_K = 20


Label = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_BLOCKED = 100


class RequestContextBody(BaseModel):
    """Where the ad will be shown: targeting and per-request block lists (all matched case-insensitively)."""

    model_config = ConfigDict(extra="forbid")

    locale: str | None = Field(
        None, min_length=2, max_length=35, pattern=r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{1,8})*$",
        description="BCP 47-like locale (en, en-GB); ads targeting locales need a match ('en' targets 'en-GB').",
    )  # fmt: skip
    device: str | None = Field(None, min_length=1, max_length=32, description="Device class (mobile, desktop, tablet, ctv, ...).")
    publisher_id: str | None = Field(None, min_length=1, max_length=128, description="Publisher whose configured blocklists apply.")
    blocked_categories: list[Label] = Field(default_factory=list, max_length=MAX_BLOCKED, description="Categories or subcategories never to serve.")
    blocked_advertisers: list[Label] = Field(default_factory=list, max_length=MAX_BLOCKED, description="Advertisers never to serve.")
    consent: bool | None = Field(
        None, description="false: the user did not consent to personalisation; the ads are chosen without history or events "
        "(contextual and popularity signals only), no history is logged, and the response says personalized: false.",
    )  # fmt: skip


class SelectRequestBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u-42",
                    "history": ["run-001", "run-002"],
                    "events": ["searched: trail running shoes"],
                    "k": 2,
                    "context": {"locale": "en-GB", "device": "mobile", "blocked_categories": ["gambling"]},
                }
            ]
        },
    )

    user_id: str = Field(min_length=1, max_length=128, description="Caller's user id (stored and logged only as a keyed hash).")
    history: list[AdId] = Field(default_factory=list, max_length=MAX_HISTORY, description="Ad/item ids seen or bought, oldest first.")
    events: list[EventText] = Field(default_factory=list, max_length=MAX_EVENTS, description="Free-text events (searches, page titles).")
    candidates: list[AdId] | None = Field(None, max_length=MAX_CANDIDATES, description="Logged candidate ids to rank; omitted = retrieve from the catalog.")
    k: int = Field(3, ge=1, le=MAX_K, description="How many ads to return.")
    deadline_ms: int | None = Field(None, ge=10, le=60000, description="Total time budget; capped by the server's max_deadline_ms.")
    use_llm: bool = Field(True, description="Let the LLM rerank, justify and rewrite (if enabled server-side).")
    rewrite: bool = Field(True, description="Ask for rewritten copy for the top pick.")
    context: RequestContextBody | None = Field(None, description="Targeting and block lists; omitted = no targeting, server block lists only.")
    impression_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="The caller's id for this impression (e.g. OpenRTB imp.id), unique per impression. It seeds the "
        "exploration draw and the scoring mode's candidate order, so a retry of the same impression draws the same slate "
        "and a replay of the log draws what was served; it is the impression log's impression_id. The response's "
        "request_id stays the service's own (feedback events name that). Omitted: the request id.",
    )


class CopyOut(BaseModel):
    headline: str
    description: str


class AdOut(BaseModel):
    ad_id: str
    title: str
    advertiser: str
    score: float = Field(description="Fused score (higher is better).")
    priors: dict[str, float] = Field(description="Per-source prior features.")
    llm_rank: int | None = Field(description="0-based position in the LLM's ranking; null if unranked or LLM unused.")
    justification: str | None
    pctr: float | None = Field(None, description="Calibrated click probability of the fused score.")
    expected_value: float | None = Field(None, description="bid × pCTR (the ranking key unless the server ranks by relevance).")
    copy_: CopyOut = Field(alias="copy", serialization_alias="copy")
    original: CopyOut
    propensity: float = Field(
        1.0, description="Probability that this ad was served at this position given the ads above it (1.0 when nothing was randomised)."
    )

    model_config = ConfigDict(populate_by_name=True)


class PromptOut(BaseModel):
    """The prompt template of the LLM stage; `sha256` is the hash of its file, as in audit lines and eval reports."""

    name: str
    version: str
    sha256: str


class SelectResponseBody(BaseModel):
    request_id: str
    ads: list[AdOut]
    llm_used: bool = Field(description="The LLM's ranking took part in this decision.")
    degraded: bool = Field(description="Served without part of what was asked (see degraded_reason); always the priors' ranking.")
    degraded_reason: DegradedReason | None = Field(description="Why the decision is degraded; null when it is not.")
    prompt: PromptOut | None = Field(
        description="Set when the request asked for the LLM stage and the service has one (llm_used, or degraded on "
        "the way): the prompt used or about to be used. Null on the fast path (use_llm false, or no LLM stage): no prompt is involved."
    )
    model: str | None = Field(description="The LLM's model name when llm_used; else null.")
    timings_ms: dict[str, float]
    unknown_ids: list[str] = Field(description="History/candidate ids not in the catalog (ignored).")
    caps_unknown: list[str] = Field(
        description="Ads whose frequency cap could not be checked (the cap store failed): not served when "
        "caps_on_error=closed, served unrecorded when open.",
    )
    arm: str = Field(description="The experiment arm (variant) that served this decision; 'default' without experiments.")
    personalized: bool = Field(description="false: chosen without history or events (the request's context.consent was false).")
    versions: dict[str, str | None] = Field(
        description="Content hashes of what served it: weights, behaviour, experiment, prompt (as in the impression log)."
    )


EventType = Literal["rendered", "click", "conversion"]


class EventBody(BaseModel):
    """A rendered / click / conversion event for an ad a decision served. `event_id` makes retries safe."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"event_id": "7f0c…-click", "request_id": "3b1f…", "ad_id": "run-007", "type": "click"}
    ]})  # fmt: skip

    event_id: str = Field(min_length=1, max_length=128, description="Caller-chosen id; a repeat is accepted once, answered 200 again.")
    request_id: str = Field(min_length=1, max_length=128, description="The request_id of the /v1/select response.")
    ad_id: AdId = Field(description="An ad that response served.")
    type: EventType
    value: float | None = Field(None, ge=-1e9, le=1e9, description="Conversion value (optional).")


class EventResponse(BaseModel):
    status: Literal["recorded", "duplicate"] = Field(description="duplicate: this event_id was already recorded (not counted twice).")


class WorkerReloadOut(BaseModel):
    generation: int = Field(description="The reload generation whose files this worker serves.")
    tried: int | None = Field(None, description="The latest generation it tried; above `generation`: that reload was refused.")
    versions: dict[str, str | None] | None = None
    error: str | None = Field(None, description="Why this worker's last catch-up was refused (it keeps its previous version).")


class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    versions: dict[str, str | None] = Field(description="What the worker that took the call serves now.")
    generation: int | None = Field(None, description="`serve --workers N`: the group's reload generation after this call; null for one process.")
    workers: dict[str, WorkerReloadOut] | None = Field(
        None, description="`serve --workers N`: every live worker by pid, once all have switched (or the wait ran out: see `pending`)."
    )
    pending: list[str] = Field(default_factory=list, description="Workers (pids) that had not switched when the wait ran out.")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    """Liveness: the process answers. Dependencies are /readyz's business."""

    status: str = Field(description="Always ok when the process answers.")
    ads: int = Field(description="Ads in the loaded catalog index.")


class CheckStatus(StrEnum):
    UP = "up"
    DOWN = "down"
    OFF = "off"  # not part of this service (no caps in offline replay, no LLM stage)
    UNCHECKED = "unchecked"  # an LLM stage with no server URL to ask (injected in tests); the breaker is shown


class ReadyStatus(StrEnum):
    READY = "ready"  # every check up (or off)
    DEGRADED = "degraded"  # only the LLM is down: the fast path serves, decisions asking for the LLM say degraded
    UNREADY = "unready"  # a required dependency (chroma, caps) is down: 503


class CheckOut(BaseModel):
    status: CheckStatus
    error: str | None = Field(None, description="The failure's type (timeout, ConnectError, ...); never its text.")
    ms: float | None = Field(None, description="Time the check took.")
    breaker: str | None = Field(None, description="LLM only: the circuit breaker's state (closed, open, half_open).")


class ReadyResponse(BaseModel):
    """Readiness: each dependency checked on its own. 503 when chroma or caps is down; the LLM is optional."""

    status: ReadyStatus
    checks: dict[str, CheckOut] = Field(description="chroma, caps, llm.")
