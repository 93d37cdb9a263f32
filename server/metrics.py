"""Prometheus metrics, one registry per app (never the global one, so tests can build many apps).

Counters are fed from two places: the guard middleware (every request, by route and status, and every
request it refuses, by reason) and the /v1/select handler (each Decision: stage timings, degradation,
LLM errors, validator rejections, caps, eligibility). State that lives in long-lived objects (the
embedder's event cache, the breaker, the LLM concurrency limiter, the in-flight gate) is read at scrape
time by a collector, so it is never stale and never double-counted.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kernel.reasons import CALL_FAILURES
from kernel.types import Decision
from server.logs import dropped_log_records

# Degradations that are the LLM failing (the rest are load or policy: busy, breaker open, off, no time left).
LLM_ERROR_REASONS = frozenset(str(r) for r in CALL_FAILURES)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Why the guard middleware answered instead of the app.
REFUSED_UNAUTHORIZED = "unauthorized"
REFUSED_RATE_LIMITED = "rate_limited"
REFUSED_SHED = "shed"
REFUSED_BODY_TOO_LARGE = "body_too_large"
REFUSED_BODY_TIMEOUT = "body_timeout"


class _LiveState(Collector):
    """Reads counters and gauges off the services at scrape time."""

    def __init__(self, services: Callable[[], Any], inflight: Callable[[], int], reading: Callable[[], int]):
        self._services = services
        self._inflight = inflight
        self._reading = reading

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("adselect_select_inflight", "/v1/select requests in progress.", value=self._inflight())
        yield CounterMetricFamily(
            "adselect_log_records_dropped", "Log records (audit lines included) dropped by a full log queue (this worker).", value=dropped_log_records()
        )
        yield GaugeMetricFamily("adselect_body_reading", "Requests whose body is still being read (they hold no slot).", value=self._reading())
        svc = self._services()
        if svc is None:
            return
        emb = getattr(svc, "embedder", None)
        if emb is not None:
            yield CounterMetricFamily("adselect_event_cache_hits", "Free-text events served from the embedder cache.", value=emb.cache_hits)
            yield CounterMetricFamily("adselect_event_cache_misses", "Free-text events encoded (cache misses).", value=emb.cache_misses)
        sel = svc.selector
        breaker = getattr(sel, "breaker", None)
        if breaker is not None:
            st = breaker.stats()
            yield GaugeMetricFamily("adselect_llm_breaker_state", "LLM circuit breaker: 0 closed, 1 half-open, 2 open.", value=st.state.gauge)
            yield CounterMetricFamily("adselect_llm_breaker_opened", "Times the LLM breaker opened.", value=st.times_opened)
            yield CounterMetricFamily("adselect_llm_breaker_rejected", "LLM calls refused by the open breaker.", value=st.rejected)
        copier = getattr(sel, "copier", None)
        if copier is not None:
            st = copier.snapshot()
            yield CounterMetricFamily("adselect_copy_cache_lookups", "Copy-cache lookups for the first served ad.", value=st["lookups"])
            yield CounterMetricFamily("adselect_copy_cache_hits", "Copy-cache lookups answered with a validated rewrite (no LLM call).", value=st["hits"])
            yield GaugeMetricFamily("adselect_copy_cache_hit_rate", "Copy-cache hits / lookups since start.", value=st["hit_rate"])
            rewrites = CounterMetricFamily(
                "adselect_copy_rewrites", "Background rewrites by outcome: generated (validated, cached), rejected (validator), "
                "enqueued, dropped_full (queue full: the miss is dropped), deduped, shared_deduped (another worker or "
                "replica generates it: shared cache), dropped_stopped.", labels=["outcome"],
            )  # fmt: skip
            for outcome in ("generated", "rejected", "enqueued", "dropped_full", "deduped", "shared_deduped", "dropped_stopped"):
                rewrites.add_metric([outcome], st[outcome])
            yield rewrites
            store = CounterMetricFamily(
                "adselect_copy_cache_store_errors", "Shared copy-cache (Redis) operations that failed, by operation: "
                "a failed read is a miss, a failed write stays in this process (agent.copy_store).", labels=["op"],
            )  # fmt: skip
            for op, n in st["store_errors"].items():
                store.add_metric([op], n)
            yield store
            failed = CounterMetricFamily("adselect_copy_rewrite_failures", "Background rewrites the LLM failed, by reason (not cached).", labels=["reason"])
            for reason, n in st["failed"].items():
                failed.add_metric([reason], n)
            yield failed
        limiter = getattr(sel, "limiter", None)
        if limiter is not None:
            yield GaugeMetricFamily("adselect_llm_inflight", "LLM calls in progress.", value=limiter.in_flight)
            yield CounterMetricFamily(
                "adselect_llm_limiter_rejected", "Requests sent to the fast path because every LLM slot was busy.", value=limiter.rejected
            )


class Metrics:
    def __init__(
        self,
        *,
        services: Callable[[], Any] = lambda: None,
        inflight: Callable[[], int] = lambda: 0,
        reading: Callable[[], int] = lambda: 0,
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("adselect_http_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "adselect_http_request_seconds", "HTTP request latency by route.", ["route"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.refused = Counter("adselect_refused", "Requests answered by the guard: unauthorized, rate_limited, shed, body_too_large, body_timeout.", ["reason"], registry=r)
        self.stage_seconds = Histogram(
            "adselect_stage_seconds", "Pipeline stage latency (profile, candidates, fusion, llm, finalize, total).", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.decisions = Counter("adselect_decisions", "Decisions served.", registry=r)
        self.llm_used = Counter("adselect_llm_used", "Decisions the LLM contributed to.", registry=r)
        self.degraded = Counter("adselect_degraded", "Decisions served without the LLM although it was asked for, by reason.", ["reason"], registry=r)
        self.llm_errors = Counter("adselect_llm_errors", "LLM calls that failed (timeout, connection, http_error, invalid_output).", ["reason"], registry=r)
        self.copy_rejections = Counter("adselect_copy_rejections", "Model text refused by the validators, by reason.", ["reason"], registry=r)
        self.cap_rejections = Counter("adselect_cap_rejections", "Ads skipped because a frequency cap was reached.", registry=r)
        self.caps_unknown = Counter(
            "adselect_caps_unknown", "Ads whose frequency cap could not be checked (cap store down), by what was done: skipped | served.",
            ["action"], registry=r,
        )  # fmt: skip
        self.ineligible = Counter("adselect_ineligible", "Candidates excluded by an eligibility rule.", ["rule"], registry=r)
        self.ads_served = Counter("adselect_ads_served", "Ads returned.", registry=r)
        self.rewrites_served = Counter(
            "adselect_rewrites_served", "Decisions whose first ad was served with a validated rewrite (share: / adselect_decisions).", registry=r
        )
        self.llm_calls = Counter("adselect_llm_calls", "LLM calls made by the ranking stage (scoring mode: one per permutation).", registry=r)
        self.score_failed_calls = Counter(
            "adselect_llm_score_failed_calls", "Scoring-mode permutation calls without a usable answer (no label in the top "
            "logprobs, no logprobs, an outage); the others are averaged, all failed: the decision is degraded.", registry=r,
        )  # fmt: skip
        self.score_missing_labels = Counter(
            "adselect_llm_score_missing_labels", "Labels absent from an answered scoring call's top logprobs (given the floor logprob).", registry=r
        )
        self._live = _LiveState(services, inflight, reading)
        r.register(self._live)
        # Labelled children looked up once (labels() takes a lock and builds a key on every call); prometheus keeps
        # one child per label set anyway, so these maps hold no more than it does.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._stage_children: dict[str, Any] = {}

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, method, status))
        if children is None:
            children = self._request_children[(route, method, status)] = (
                self.requests.labels(route, method, str(status)), self.request_seconds.labels(route)
            )  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def observe_refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def observe_decision(self, d: Decision) -> None:
        self.decisions.inc()
        self.ads_served.inc(len(d.ads))
        for stage, ms in d.timings_ms.items():
            child = self._stage_children.get(stage)
            if child is None:
                child = self._stage_children[stage] = self.stage_seconds.labels(stage)
            child.observe(ms / 1000.0)
        if d.llm_used:
            self.llm_used.inc()
        if d.degraded and d.degraded_reason:
            self.degraded.labels(d.degraded_reason).inc()
            if d.degraded_reason in LLM_ERROR_REASONS:
                self.llm_errors.labels(d.degraded_reason).inc()
        if d.ads and d.ads[0].copy != d.ads[0].original:
            self.rewrites_served.inc()
        for counter, key in ((self.llm_calls, "llm_calls"), (self.score_failed_calls, "score_failed_calls"), (self.score_missing_labels, "score_missing_labels")):
            if d.usage.get(key):  # the fast path's usage is empty: no increments of 0
                counter.inc(d.usage[key])
        for reason in d.copy_rejections:
            self.copy_rejections.labels(reason).inc()
        if d.capped:
            self.cap_rejections.inc(len(d.capped))
        served = {a.ad.ad_id for a in d.ads}
        for ad_id in d.caps_unknown:
            self.caps_unknown.labels("served" if ad_id in served else "skipped").inc()
        for rule, n in collections.Counter(d.ineligible.values()).items():  # one increment per rule, not per candidate
            self.ineligible.labels(rule).inc(n)

    def render(self) -> tuple[bytes, str]:
        """This process's registry; with several workers (PROMETHEUS_MULTIPROC_DIR set, server/multiworker.py)
        the counters and histograms of all of them, summed, plus this worker's live gauges."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            merged.register(self._live)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
