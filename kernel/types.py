"""Typed data passed between pipeline stages (plain dataclasses; wire models live in server/protocol.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


# Ad.metadata key of extra text for the retrieval document (the ingest's LLM summary, when
# ADSELECT_UNDERSTAND_SUMMARY_IN_DOCUMENT is on; agent.understanding.with_understanding writes it).
DOCUMENT_EXTRA_KEY = "document_extra"


@dataclass(frozen=True, slots=True)
class Ad:
    ad_id: str
    title: str
    text: str = ""
    category: str = ""
    subcategory: str = ""
    advertiser: str = ""
    bid: float = 1.0
    landing_url: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def document(self) -> str:
        """The text embedded for this ad and used by BM25."""
        parts = [self.title]
        if self.category:
            parts.append(self.category if not self.subcategory else f"{self.category} / {self.subcategory}")
        if self.text:
            parts.append(self.text)
        extra = self.metadata.get(DOCUMENT_EXTRA_KEY) if self.metadata else None
        if isinstance(extra, str) and extra:
            parts.append(extra)
        return ". ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Copy:
    headline: str
    description: str


@dataclass(slots=True)
class Candidate:
    ad: Ad
    priors: dict[str, float]  # per-source scores, named by retrieval.features.FEATURES
    prior_score: float = 0.0  # fused score without the LLM
    prior_rank: int = 0  # 0-based rank by prior_score


@dataclass(frozen=True, slots=True)
class RequestContext:
    now: datetime  # naive = UTC
    locale: str | None = None
    device: str | None = None
    publisher_id: str | None = None
    blocked_categories: frozenset[str] = frozenset()
    blocked_advertisers: frozenset[str] = frozenset()
    consent: bool | None = None  # False: the user refused personalisation (no history, no events, none logged)


@dataclass(slots=True)
class SelectRequest:
    user_id: str
    history: list[str]
    events: list[str] = field(default_factory=list)
    candidates: list[str] | None = None
    k: int = 3
    deadline_ms: int = 2000
    use_llm: bool = True
    rewrite: bool = True
    request_id: str = ""
    context: RequestContext | None = None  # (locale, device, publisher, block lists, now); None = now, no targeting
    impression_id: str = ""  # the caller's impression id ("" = none): the draws' seed and the log's impression_id (draw_id)

    def draw_id(self, fallback: str = "") -> str:
        """The id the request's random draws (exploration, the scoring mode's order) and its log record's
        impression_id are keyed by: the caller's impression id, else the request id, else `fallback`."""
        return self.impression_id or self.request_id or fallback


@dataclass(slots=True)
class LLMResult:
    ranking: list[str]  # candidate ids, best first (validated: subset of the candidates, no repeats)
    justification: str | None
    copy: Copy | None  # for `copy_for`
    raw: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float = 0.0
    copy_for: str | None = None  # the ad the justification and copy describe (the one the pipeline expects to serve)
    refusals: list[str] = field(default_factory=list)  # model text dropped before the pipeline saw it (e.g. prompt echo)
    copy_rejected: str | None = None  # the parser's reason a requested rewrite was unusable (agent.reasons vocabulary)


@dataclass(slots=True)
class RankedAd:
    ad: Ad
    score: float
    priors: dict[str, float]
    llm_rank: int | None
    justification: str | None
    copy: Copy
    original: Copy
    pctr: float | None = None  # calibrated click probability of the fused score
    expected_value: float | None = None  # bid × pCTR
    propensity: float = 1.0  # P(this ad at this position | the ads above it) under the arm's policy


@dataclass(slots=True)
class Decision:
    request_id: str
    ads: list[RankedAd]
    llm_used: bool
    degraded: bool
    degraded_reason: str | None
    prompt: dict[str, str] | None
    model: str | None
    timings_ms: dict[str, float]
    unknown_ids: list[str]
    ranking: list[str] = field(default_factory=list)  # the full fused ranking of candidate ids (eval uses it)
    usage: dict[str, int] = field(default_factory=dict)
    copy_rejections: list[str] = field(default_factory=list)  # validator reasons when a rewrite was refused
    ineligible: dict[str, str] = field(default_factory=dict)  # ad_id -> rule that excluded it
    capped: list[str] = field(default_factory=list)  # ads skipped because a frequency cap was reached
    # ads whose frequency cap could not be checked (the cap store failed): not served (caps_on_error=closed)
    # or served unrecorded (open)
    caps_unknown: list[str] = field(default_factory=list)
    arm: str = "default"  # the experiment arm (variant) that served it
    personalized: bool = True  # False: selected without history or events (no consent)
    versions: dict[str, str | None] = field(default_factory=dict)  # weights, experiment, behaviour, prompt
