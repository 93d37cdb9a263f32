"""Feedback: rendered / click / conversion events for served ads, stored durably and joinable to the log.

`FeedbackStore(path)` is one SQLite file (WAL) with two tables:
- `served_ads`: what each decision served (the pipeline calls `record_served` once per decision), so an
  event can be checked against it: an unknown (or older than `window_s`) request id raises
  `UnknownRequest`, an ad that request did not serve raises `AdNotServed` (both `UserError`s: a 4xx).
- `events`: one row per event id. `record()` is idempotent by event id: a retry with the same payload
  answers "duplicate" and is not stored twice; the same id with another payload raises `EventIdConflict`.

Durability: events are committed with `synchronous=FULL` by default (acknowledged = survives power loss;
`NORMAL` = survives a killed process); served rows always with `NORMAL` (they are written on the request
path, and a served row lost to power loss only makes its late events "unknown").

Rendered-impression caps: the first `rendered` event of a (request, ad) calls the injected
`on_rendered` hook (`RenderHook.confirm_render`) after commit, so a cap store can turn the decision's
reservation into a counted impression; reservations never rendered give their slot back after a grace time
(the cap store's side of this is described in `RenderHook`).

`join(records)` adds to each impression-log record: `clicked` (served order), `rendered`,
`conversions` {ad_id: count} and `conversion_value` {ad_id: sum of values}.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from kernel.errors import AdNotServed, EventIdConflict, RuntimeFault, UnknownRequest, UserError
from selection.sqlite_wal import connect_wal, set_synchronous

log = logging.getLogger(__name__)

EventType = Literal["rendered", "click", "conversion"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
Outcome = Literal["recorded", "duplicate"]
MAX_ABS_VALUE = 1e9
JOIN_CHUNK = 500  # request ids per query in join()


class FeedbackStoreError(RuntimeFault):
    """The feedback store could not be read or written."""

    code = "feedback_store_unavailable"


class RenderHook(Protocol):
    """Told once per (request, ad) when the ad was first rendered.

    A cap store in `cap_count="rendered"` mode implements it: `try_reserve(..., reservation_id=request_id)`
    records a *pending* reservation; pending reservations count against the cap only while younger than
    `cap_render_grace_s`; `confirm_render` turns the pending one into a counted impression (timestamped at
    reservation time, so the window is unchanged). A decision never rendered thus gives its slot back after
    the grace time.
    """

    def confirm_render(self, *, user_key: str, ad_id: str, advertiser: str, reservation_id: str, reserved_at: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ServedAdRow:
    """One ad of a served decision, as the store keeps it for validation and the join."""

    ad_id: str
    advertiser: str = ""
    bid: float = 1.0


@dataclass(frozen=True, slots=True)
class ServedDecision:
    """What one request served (`record_served_many` writes several in one transaction)."""

    request_id: str
    user_key: str
    ads: tuple[ServedAdRow, ...]
    arm: str
    now: float


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    event_id: str
    request_id: str
    ad_id: str
    type: str
    value: float | None
    ts: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS served_ads (
    request_id  TEXT NOT NULL,
    ad_id       TEXT NOT NULL,
    position    INTEGER NOT NULL,
    user_key    TEXT NOT NULL,
    advertiser  TEXT NOT NULL,
    bid         REAL NOT NULL,
    arm         TEXT NOT NULL,
    ts          REAL NOT NULL,
    rendered_at REAL,
    PRIMARY KEY (request_id, ad_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS served_ads_ts ON served_ads (ts);
CREATE TABLE IF NOT EXISTS served_requests (
    request_id TEXT PRIMARY KEY,
    arm        TEXT NOT NULL,
    ts         REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS served_requests_ts ON served_requests (ts);
CREATE TABLE IF NOT EXISTS events (
    event_id   TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    ad_id      TEXT NOT NULL,
    type       TEXT NOT NULL,
    value      REAL,
    ts         REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_request ON events (request_id);
"""


class FeedbackStore:
    """Served decisions and their events in one SQLite file. Thread-safe; reopens its connection after a fork."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        window_s: float = 7 * 86400,
        busy_timeout_s: float = 5.0,
        on_rendered: RenderHook | None = None,
    ):
        self.path = Path(path)
        self.synchronous = synchronous
        self.window_s = float(window_s)
        self.busy_timeout_s = busy_timeout_s
        self.on_rendered = on_rendered
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._sync_level = ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._connection().executescript(_SCHEMA)

    @classmethod
    def from_settings(cls, settings, *, on_rendered: RenderHook | None = None) -> "FeedbackStore":
        return cls(
            settings.feedback_path or Path(settings.data_dir) / "feedback.sqlite",
            synchronous=settings.feedback_synchronous,
            window_s=settings.feedback_window_s,
            on_rendered=on_rendered,
        )

    def _connection(self, level: str = "NORMAL") -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = connect_wal(self.path, busy_timeout_s=self.busy_timeout_s, synchronous=level)
            self._pid, self._sync_level = os.getpid(), level
        elif self._sync_level != level:
            set_synchronous(self._conn, level)
            self._sync_level = level
        return self._conn

    # ---- written by the pipeline, once per decision --------------------------------------------
    def record_served(
        self, *, request_id: str, user_key: str, ads: Sequence[ServedAdRow], arm: str = "default", now: float | None = None
    ) -> None:
        """Remember what `request_id` served (a decision serving nothing is remembered too)."""
        self.record_served_many([ServedDecision(request_id, user_key, tuple(ads), arm, time.time() if now is None else now)])

    def record_served_many(self, decisions: Sequence[ServedDecision]) -> None:
        """`record_served` for each decision, all in one transaction (selection.served_queue batches what queued up)."""
        try:
            with self._lock:
                conn = self._connection("NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "INSERT OR REPLACE INTO served_requests (request_id, arm, ts) VALUES (?, ?, ?)",
                        [(d.request_id, d.arm, d.now) for d in decisions],
                    )
                    conn.executemany(
                        "INSERT OR REPLACE INTO served_ads (request_id, ad_id, position, user_key, advertiser, bid, arm, ts)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(d.request_id, a.ad_id, i, d.user_key, a.advertiser, float(a.bid), d.arm, d.now) for d in decisions for i, a in enumerate(d.ads)],
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            raise FeedbackStoreError(f"feedback store {self.path}: {e}") from e

    # ---- POST /v1/events ---------------------------------------------------------------------
    def record(
        self,
        *,
        event_id: str,
        request_id: str,
        ad_id: str,
        type: str,
        value: float | None = None,
        now: float | None = None,
    ) -> Outcome:
        """Store one event once: "recorded", or "duplicate" for a retry of an event id already stored.

        Raises `UnknownRequest`, `AdNotServed`, `EventIdConflict` (UserErrors) or `FeedbackStoreError`."""
        if type not in EVENT_TYPES:
            raise UserError(f"event type must be one of {', '.join(EVENT_TYPES)}, not {type!r}")
        if value is not None:
            value = float(value)
            if not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
                raise UserError(f"event value must be a finite number of magnitude <= {MAX_ABS_VALUE:g}")
        now = time.time() if now is None else now
        first_render: tuple | None = None
        try:
            with self._lock:
                conn = self._connection(self.synchronous)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    prior = conn.execute(
                        "SELECT request_id, ad_id, type, value FROM events WHERE event_id=?", (event_id,)
                    ).fetchone()
                    if prior is not None:
                        conn.execute("ROLLBACK")
                        if tuple(prior) != (request_id, ad_id, type, value):
                            raise EventIdConflict(event_id)
                        return "duplicate"
                    req = conn.execute(
                        "SELECT 1 FROM served_requests WHERE request_id=? AND ts>?", (request_id, now - self.window_s)
                    ).fetchone()
                    if req is None:
                        raise UnknownRequest(request_id)
                    served = conn.execute(
                        "SELECT user_key, advertiser, ts, rendered_at FROM served_ads WHERE request_id=? AND ad_id=?",
                        (request_id, ad_id),
                    ).fetchone()
                    if served is None:
                        raise AdNotServed(request_id, ad_id)
                    conn.execute(
                        "INSERT INTO events (event_id, request_id, ad_id, type, value, ts) VALUES (?, ?, ?, ?, ?, ?)",
                        (event_id, request_id, ad_id, type, value, now),
                    )
                    if type == "rendered" and served[3] is None:
                        conn.execute(
                            "UPDATE served_ads SET rendered_at=? WHERE request_id=? AND ad_id=?", (now, request_id, ad_id)
                        )
                        first_render = (served[0], served[1], served[2])
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            raise FeedbackStoreError(f"feedback store {self.path}: {e}") from e
        if first_render is not None and self.on_rendered is not None:
            user_key, advertiser, reserved_at = first_render
            try:
                self.on_rendered.confirm_render(
                    user_key=user_key, ad_id=ad_id, advertiser=advertiser, reservation_id=request_id, reserved_at=reserved_at
                )
            except Exception:  # the event is stored; the reservation then lapses after the grace time
                log.exception("rendered hook failed", extra={"request_id": request_id, "ad_id": ad_id})
        return "recorded"

    # ---- reading -----------------------------------------------------------------------------
    def events_for(self, request_id: str) -> list[FeedbackEvent]:
        return self._events([request_id]).get(request_id, [])

    def _events(self, request_ids: Sequence[str]) -> dict[str, list[FeedbackEvent]]:
        out: dict[str, list[FeedbackEvent]] = {}
        try:
            with self._lock:
                conn = self._connection(self.synchronous)
                for i in range(0, len(request_ids), JOIN_CHUNK):
                    chunk = list(request_ids[i : i + JOIN_CHUNK])
                    marks = ",".join("?" * len(chunk))
                    for row in conn.execute(
                        f"SELECT event_id, request_id, ad_id, type, value, ts FROM events WHERE request_id IN ({marks})"
                        " ORDER BY ts, event_id",
                        chunk,
                    ):
                        ev = FeedbackEvent(*row)
                        out.setdefault(ev.request_id, []).append(ev)
        except sqlite3.Error as e:
            raise FeedbackStoreError(f"feedback store {self.path}: {e}") from e
        return out

    def join(self, records: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        """Each log record with `clicked`, `rendered`, `conversions` and `conversion_value` filled from events."""
        it = iter(records)
        while True:
            chunk = [dict(r) for _, r in zip(range(JOIN_CHUNK), it)]
            if not chunk:
                return
            ids = [str(r.get("request_id") or r.get("impression_id")) for r in chunk]
            events = self._events(ids)
            for rec, rid in zip(chunk, ids):
                yield joined(rec, events.get(rid, []))

    def arm_totals(self) -> dict[str, dict[str, float]]:
        """Per arm: decisions, served ads, rendered ads, clicked ads, conversions and revenue (Σ bid of clicked ads)."""
        sql = """
        SELECT s.arm, count(*), count(s.rendered_at), sum(c.clicked IS NOT NULL), coalesce(sum(c.conversions), 0),
               coalesce(sum(CASE WHEN c.clicked IS NOT NULL THEN s.bid END), 0.0)
        FROM served_ads s LEFT JOIN (
            SELECT request_id, ad_id, sum(type='conversion') AS conversions,
                   CASE WHEN max(type='click') THEN 1 END AS clicked
            FROM events GROUP BY request_id, ad_id
        ) c ON c.request_id=s.request_id AND c.ad_id=s.ad_id
        GROUP BY s.arm
        """
        try:
            with self._lock:
                conn = self._connection(self.synchronous)
                totals = {
                    arm: {"decisions": n, "served": 0, "rendered": 0, "clicks": 0, "conversions": 0, "revenue": 0.0}
                    for arm, n in conn.execute("SELECT arm, count(*) FROM served_requests GROUP BY arm")
                }
                for arm, served, rendered, clicks, conversions, revenue in conn.execute(sql):
                    totals.setdefault(arm, {"decisions": 0}).update(
                        served=served, rendered=rendered, clicks=clicks or 0, conversions=conversions, revenue=float(revenue)
                    )
        except sqlite3.Error as e:
            raise FeedbackStoreError(f"feedback store {self.path}: {e}") from e
        return totals

    def prune(self, *, now: float | None = None) -> int:
        """Forget served decisions older than the window (their events stay); returns how many."""
        now = time.time() if now is None else now
        try:
            with self._lock:
                conn = self._connection("NORMAL")
                n = conn.execute("DELETE FROM served_requests WHERE ts<=?", (now - self.window_s,)).rowcount
                conn.execute("DELETE FROM served_ads WHERE ts<=?", (now - self.window_s,))
                return n
        except sqlite3.Error as e:
            raise FeedbackStoreError(f"feedback store {self.path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def joined(record: Mapping[str, Any], events: Sequence[FeedbackEvent]) -> dict[str, Any]:
    """`record` with its events folded in; clicked/rendered follow the served order, each ad once."""
    out = dict(record)
    served = list(record.get("served") or [])
    rank = {a: i for i, a in enumerate(served)}
    clicked = {e.ad_id for e in events if e.type == "click"}
    rendered = {e.ad_id for e in events if e.type == "rendered"}
    conversions: dict[str, int] = {}
    value: dict[str, float] = {}
    for e in events:
        if e.type == "conversion":
            conversions[e.ad_id] = conversions.get(e.ad_id, 0) + 1
            if e.value is not None:
                value[e.ad_id] = value.get(e.ad_id, 0.0) + e.value
    order = lambda ids: sorted(ids, key=lambda a: (rank.get(a, len(rank)), a))  # noqa: E731
    out["clicked"] = order(clicked)
    out["rendered"] = order(rendered)
    out["conversions"] = conversions
    out["conversion_value"] = value
    return out
