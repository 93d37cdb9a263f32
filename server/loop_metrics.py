"""Per-arm outcomes and the impression log's health, read at scrape time (never stale, never double-counted).

Per arm, from the feedback store (one SQLite file under the data dir, so every worker process reports the
same totals): impressions (served ads), decisions, rendered, clicks, conversions, revenue (Σ bid of clicked
ads), CTR = clicks / impressions and revenue per impression. From the impression log writer of this process:
records accepted, written, dropped and failed.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class LoopState(Collector):
    def __init__(self, services: Callable[[], Any]):
        self._services = services

    def collect(self) -> Iterator[Metric]:
        svc = self._services()
        if svc is None:
            return
        yield from self._arms(svc)
        writer = getattr(svc, "impressions", None)
        if writer is not None:
            st = writer.stats()
            fam = CounterMetricFamily("adselect_impression_log_records", "Impression-log records of this process, by outcome.", labels=["outcome"])
            for outcome in ("accepted", "written", "dropped", "failed"):
                fam.add_metric([outcome], getattr(st, outcome))
            yield fam

    def _arms(self, svc: Any) -> Iterator[Metric]:
        store = getattr(svc, "feedback", None)
        if store is None:
            return
        try:
            totals = store.arm_totals()
        except Exception:  # a scrape must not fail because the feedback store did
            log.exception("feedback store unreadable at scrape time")
            return
        counters = {
            "decisions": "Decisions served, per arm.",
            "served": "Ads served (impressions), per arm.",
            "rendered": "Served ads reported rendered, per arm.",
            "clicks": "Served ads clicked, per arm.",
            "conversions": "Conversion events, per arm.",
            "revenue": "Revenue (sum of bid over clicked ads), per arm.",
        }
        for key, doc in counters.items():
            name = "impressions" if key == "served" else key
            fam = CounterMetricFamily(f"adselect_arm_{name}", doc, labels=["arm"])
            for arm, t in sorted(totals.items()):
                fam.add_metric([arm], float(t.get(key, 0) or 0))
            yield fam
        ctr = GaugeMetricFamily("adselect_arm_ctr", "Clicks per impression, per arm.", labels=["arm"])
        rpi = GaugeMetricFamily("adselect_arm_revenue_per_impression", "Revenue per impression, per arm.", labels=["arm"])
        for arm, t in sorted(totals.items()):
            n = float(t.get("served", 0) or 0)
            ctr.add_metric([arm], (t.get("clicks", 0) or 0) / n if n else 0.0)
            rpi.add_metric([arm], (t.get("revenue", 0.0) or 0.0) / n if n else 0.0)
        yield ctr
        yield rpi
