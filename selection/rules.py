"""Eligibility: which ads may be shown for one request.

Three sources of exclusion are combined, all case-insensitive:
- `EligibilityPolicy` (service config): minimum bid, blocked categories/advertisers, and per-publisher
  blocklists (`PublisherBlocklist`, loaded from a JSON file: {"pub-1": {"categories": [...],
  "advertisers": [...]}}).
- `RequestContext` (per request): the caller's own blocked categories/advertisers.
- The ad's targeting in `Ad.metadata`: `start`/`end` (ISO date or datetime; a date-only `end` includes
  that whole day; naive datetimes are UTC), `locales` (list; "en" matches "en-GB"), `devices` (list).
  Targeting that cannot be parsed makes the ad ineligible (fail closed), with reason "invalid_targeting".

An ad without a category of its own is blocked by the category the LLM extracted for it at ingest
(`blocklist_category`; agent.understanding marks it `category_source: "extracted"`).

`is_eligible()` is authoritative. `chroma_where()` is a prefilter for Chroma queries: it expresses the
bid and block lists as metadata filters with exact-case values, so it never excludes an ad that
`is_eligible()` would accept, but it may let through ads that differ only in case; re-check with
`is_eligible()`/`filter_eligible()` after retrieval.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agent.understanding import extracted_category
from kernel.errors import DataFileError
from kernel.types import Ad, Candidate, RequestContext

log = logging.getLogger(__name__)

# Reason codes (stable strings for logs and metrics).
BID_TOO_LOW = "bid_below_min"
BLOCKED_CATEGORY = "blocked_category"
BLOCKED_ADVERTISER = "blocked_advertiser"
NOT_STARTED = "not_started"
EXPIRED = "expired"
LOCALE = "locale_mismatch"
DEVICE = "device_mismatch"
INVALID_TARGETING = "invalid_targeting"


def _fold(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().casefold() for v in values if v and v.strip())


@dataclass(frozen=True, slots=True)
class PublisherBlocklist:
    categories: frozenset[str] = frozenset()
    advertisers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EligibilityPolicy:
    min_bid: float = 0.0
    blocked_categories: frozenset[str] = frozenset()
    blocked_advertisers: frozenset[str] = frozenset()
    publishers: Mapping[str, PublisherBlocklist] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings) -> EligibilityPolicy:
        path = settings.publisher_blocklists_path
        return cls(
            min_bid=settings.min_bid,
            blocked_categories=frozenset(settings.blocked_categories),
            blocked_advertisers=frozenset(settings.blocked_advertisers),
            publishers=load_publisher_blocklists(path) if path is not None else {},
        )


class Eligibility(NamedTuple):
    ok: bool
    reason: str | None


_OK = Eligibility(True, None)


def load_publisher_blocklists(path: Path) -> dict[str, PublisherBlocklist]:
    """{"pub-id": {"categories": [...], "advertisers": [...]}, ...}; unknown keys are an error."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataFileError(str(path), None, f"cannot read publisher blocklists: {e}") from e
    if not isinstance(raw, dict):
        raise DataFileError(str(path), None, "expected an object keyed by publisher id")
    out: dict[str, PublisherBlocklist] = {}
    for pub, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) - {"categories", "advertisers"}:
            raise DataFileError(str(path), None, f"publisher {pub!r}: expected only 'categories' and 'advertisers'")
        lists = {}
        for key in ("categories", "advertisers"):
            values = entry.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise DataFileError(str(path), None, f"publisher {pub!r}: {key!r} must be a list of strings")
            lists[key] = frozenset(values)
        out[str(pub)] = PublisherBlocklist(**lists)
    return out


def _blocked(ctx: RequestContext, policy: EligibilityPolicy) -> tuple[frozenset[str], frozenset[str]]:
    """All blocked categories and advertisers for this request, unfolded (as configured)."""
    pub = policy.publishers.get(ctx.publisher_id) if ctx.publisher_id is not None else None
    cats = policy.blocked_categories | ctx.blocked_categories | (pub.categories if pub else frozenset())
    advs = policy.blocked_advertisers | ctx.blocked_advertisers | (pub.advertisers if pub else frozenset())
    return cats, advs


def _as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _bound(value: Any, *, end: bool) -> datetime:
    """Parse a window bound; a date-only end means the start of the following day (exclusive)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO date string, got {type(value).__name__}")
    s = value.strip()
    if len(s) == 10:  # YYYY-MM-DD
        d = date.fromisoformat(s) + (timedelta(days=1) if end else timedelta(0))
        return datetime.combine(d, time.min, tzinfo=timezone.utc)
    return _as_utc(datetime.fromisoformat(s))


def _locale_key(value: str) -> str:
    return value.strip().replace("_", "-").casefold()


def _locale_matches(targets: list[str], locale: str) -> bool:
    want = _locale_key(locale)
    for t in targets:
        t = _locale_key(t)
        if want == t or want.startswith(t + "-"):
            return True
    return False


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("expected a list of strings")


def _targeting(ad: Ad, ctx: RequestContext) -> Eligibility:
    meta = ad.metadata or {}
    now = _as_utc(ctx.now)
    start, end = meta.get("start"), meta.get("end")
    if start not in (None, "") and now < _bound(start, end=False):
        return Eligibility(False, NOT_STARTED)
    if end not in (None, "") and now >= _bound(end, end=True):
        return Eligibility(False, EXPIRED)
    locales = meta.get("locales")
    if locales not in (None, []):
        if not ctx.locale or not _locale_matches(_str_list(locales), ctx.locale):
            return Eligibility(False, LOCALE)
    devices = meta.get("devices")
    if devices not in (None, []):
        if not ctx.device or ctx.device.strip().casefold() not in _fold(_str_list(devices)):
            return Eligibility(False, DEVICE)
    return _OK


def blocklist_category(ad: Ad) -> str:
    """The category block lists match: the ad's own, else the one extracted at ingest (else empty)."""
    return ad.category or extracted_category(ad) or ""


def is_eligible(ad: Ad, ctx: RequestContext, policy: EligibilityPolicy) -> Eligibility:
    """(True, None) or (False, reason code). Checks bid, block lists, then the ad's targeting."""
    if not ad.bid >= policy.min_bid:  # also rejects a NaN bid
        return Eligibility(False, BID_TOO_LOW)
    cats, advs = _blocked(ctx, policy)
    if cats and not _fold(cats).isdisjoint(_fold((blocklist_category(ad), ad.subcategory))):
        return Eligibility(False, BLOCKED_CATEGORY)
    if advs and ad.advertiser.strip().casefold() in _fold(advs):
        return Eligibility(False, BLOCKED_ADVERTISER)
    try:
        return _targeting(ad, ctx)
    except (ValueError, TypeError) as e:
        log.warning("invalid targeting metadata", extra={"ad_id": ad.ad_id, "error": str(e)})
        return Eligibility(False, INVALID_TARGETING)


_TARGETING_KEYS = ("start", "end", "locales", "devices")


@dataclass(frozen=True)
class EligibilityTable:
    """What `is_eligible()` reads of each catalog ad, as arrays, so one request's eligibility over hundreds
    of rows is a few vector operations. Built once per catalog index.

    `check()` is exact: rows that pass the vectorised bid and block-list test and carry no targeting are
    eligible (`is_eligible()` would say so); every other row goes through `is_eligible()` itself, which
    gives its reason."""

    bid: np.ndarray  # float64 per row
    category: np.ndarray  # int32 codes of the folded category, subcategory, advertiser
    subcategory: np.ndarray
    advertiser: np.ndarray
    categories: dict[str, int]  # folded value -> code (categories and subcategories share one vocabulary)
    advertisers: dict[str, int]
    targeted: np.ndarray  # bool: the ad has targeting metadata (start, end, locales, devices)

    @classmethod
    def from_ads(cls, ads: list[Ad]) -> EligibilityTable:
        cats: dict[str, int] = {}
        advs: dict[str, int] = {}
        n = len(ads)

        def codes(values, vocab: dict[str, int]) -> np.ndarray:
            return np.fromiter((vocab.setdefault(v.strip().casefold(), len(vocab)) for v in values), dtype=np.int32, count=n)

        return cls(
            bid=np.fromiter((a.bid for a in ads), dtype=np.float64, count=n),
            category=codes((blocklist_category(a) for a in ads), cats),
            subcategory=codes((a.subcategory for a in ads), cats),
            advertiser=codes((a.advertiser for a in ads), advs),
            categories=cats,
            advertisers=advs,
            targeted=np.fromiter(
                (any(a.metadata.get(k) not in (None, "", []) for k in _TARGETING_KEYS) if a.metadata else False for a in ads),
                dtype=bool,
                count=n,
            ),
        )

    def check(self, rows: np.ndarray, ads: list[Ad], ctx: RequestContext, policy: EligibilityPolicy) -> tuple[np.ndarray, dict[int, str]]:
        """(keep mask over `rows`, {row: reason} for the ineligible rows, in `rows` order)."""
        cats, advs = _blocked(ctx, policy)
        fast = self.bid[rows] >= policy.min_bid
        fast &= ~self.targeted[rows]
        if cats:
            blocked = np.asarray([self.categories[c] for c in _fold(cats) if c in self.categories], dtype=np.int32)
            if len(blocked):
                fast &= ~np.isin(self.category[rows], blocked) & ~np.isin(self.subcategory[rows], blocked)
        if advs:
            blocked = np.asarray([self.advertisers[a] for a in _fold(advs) if a in self.advertisers], dtype=np.int32)
            if len(blocked):
                fast &= ~np.isin(self.advertiser[rows], blocked)
        keep = fast.copy()
        reasons: dict[int, str] = {}
        for i in np.flatnonzero(~fast).tolist():
            row = int(rows[i])
            ok, reason = is_eligible(ads[row], ctx, policy)
            keep[i] = ok
            if not ok:
                reasons[row] = reason or "ineligible"
        return keep, reasons


def filter_eligible(
    candidates: Iterable[Candidate], ctx: RequestContext, policy: EligibilityPolicy
) -> tuple[list[Candidate], dict[str, str]]:
    """Eligible candidates in input order, and {ad_id: reason} for the rest."""
    kept: list[Candidate] = []
    dropped: dict[str, str] = {}
    for c in candidates:
        ok, reason = is_eligible(c.ad, ctx, policy)
        if ok:
            kept.append(c)
        else:
            dropped[c.ad.ad_id] = reason or "ineligible"
    return kept, dropped


def chroma_where(ctx: RequestContext, policy: EligibilityPolicy) -> dict[str, Any] | None:
    """A Chroma `where` filter for bid and block lists (see module doc), or None when nothing applies."""
    cats, advs = _blocked(ctx, policy)
    clauses: list[dict[str, Any]] = []
    if policy.min_bid > 0:
        clauses.append({"bid": {"$gte": float(policy.min_bid)}})
    if cats:
        values = sorted(cats)
        clauses.append({"category": {"$nin": values}})
        clauses.append({"subcategory": {"$nin": values}})
    if advs:
        clauses.append({"advertiser": {"$nin": sorted(advs)}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
