"""Frequency caps: at most N impressions per user per ad, and M per user per advertiser, in a sliding window.

`CapStore.try_reserve()` checks both caps and records the impression in one atomic step, so parallel
requests for one user can never exceed a cap. An impression at time t counts while `t > now - window_s`.
An ad with an empty advertiser is checked against the per-ad cap only.

Two stores, same semantics:
- `SQLiteCapStore(path)`: embedded; WAL (synchronous=NORMAL), one `BEGIN IMMEDIATE` transaction per call,
  so it is safe across threads (one connection behind a lock) and across processes (SQLite's write lock).
- `RedisCapStore(client)`: a Lua script over two sorted sets per reservation (score = time), each
  expiring `window_s` after its last write. Keys share a `{user_key}` hash tag (Redis Cluster safe).

`reserve_in_order()` (what the pipeline calls) reserves a request's ads in one round trip: `reserve_many`
(one SQLite transaction, one Redis script call) on both stores.

`reserve()` returns a `Reservation` that `release()` gives back (the pipeline does when a response fails
after some ads were reserved); `try_reserve()` is the same check as a bool.

`user_key` should be `kernel.hashing.user_key(user_id, secret=...)`, never a raw user id.
Store failures raise `CapStoreError` so the caller chooses between serving uncapped and not serving
(`Settings.caps_on_error`, applied in selection.pipeline). A Redis store answers within its socket
timeout (no retries) and, after a failure, raises at once for `retry_after_s` before it tries again.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kernel.errors import RuntimeFault
from selection.sqlite_wal import connect_wal

log = logging.getLogger(__name__)


class CapStoreError(RuntimeFault):
    """The frequency-cap store could not be read or written."""

    code = "cap_store_unavailable"


@dataclass(frozen=True, slots=True)
class CapConfig:
    max_per_ad: int | None = 3  # None: no per-ad cap
    max_per_advertiser: int | None = 10  # None: no per-advertiser cap
    window_s: float = 86_400.0
    # cap_count=rendered: a reservation is pending until its ad is reported rendered (confirm_render); a pending
    # one counts only while younger than render_grace_s, so a decision never rendered gives its slot back then
    count_rendered: bool = False
    render_grace_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_per_ad", "max_per_advertiser"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")

    @classmethod
    def from_settings(cls, settings) -> CapConfig:
        """Settings use 0 for "no cap"."""
        return cls(
            max_per_ad=settings.cap_max_per_ad or None,
            max_per_advertiser=settings.cap_max_per_advertiser or None,
            window_s=float(settings.cap_window_s),
            count_rendered=settings.cap_count == "rendered",
            render_grace_s=float(settings.cap_render_grace_s),
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """One recorded impression; `token` names it in its store (row id, sorted-set member)."""

    user_key: str
    ad_id: str
    advertiser: str
    token: str


class CapStore(Protocol):
    config: CapConfig

    def reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> Reservation | None:
        """Record an impression if both caps allow it and return it; else change nothing, return None."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation (the ad was not served after all); releasing twice is harmless."""
        ...

    # Optional: reserve_many(user_key, items, *, limit, now=None) -> list[Reservation | None], the same checks
    # for (ad_id, advertiser) items in order until `limit` are reserved, in one round trip (all or nothing on
    # a store failure). reserve_in_order() uses it when the store has it.

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        """Impressions in the window for this user and ad, or this user and advertiser (exactly one given)."""
        ...

    def close(self) -> None: ...


def reserve_in_order(
    store: CapStore,
    user_key: str,
    items: list[tuple[str, str]],
    *,
    limit: int,
    reserved: list[Reservation],
    now: float | None = None,
) -> tuple[list[Reservation | None], CapStoreError | None]:
    """Verdicts (a Reservation, or None: capped) for (ad_id, advertiser) `items` in order until `limit` are
    reserved, each reservation also appended to `reserved` as soon as it exists (so a caller that fails later
    can give it back). A store failure ends the walk: the verdicts so far and the error (the rest unknown).

    One round trip when the store has `reserve_many` (SQLite: one transaction; Redis: one script call)."""
    many = getattr(store, "reserve_many", None)
    if many is not None:
        try:
            out = many(user_key, items, limit=limit, now=now)
        except CapStoreError as e:
            return [], e
        reserved.extend(r for r in out if r is not None)
        return out, None
    out = []
    for ad_id, advertiser in items:
        if len(out) - out.count(None) >= limit:
            break
        try:
            r = store.reserve(user_key, ad_id, advertiser, now=now)
        except CapStoreError as e:
            return out, e
        out.append(r)
        if r is not None:
            reserved.append(r)
    return out, None


def _one_of(ad_id: str | None, advertiser: str | None) -> None:
    if (ad_id is None) == (advertiser is None):
        raise ValueError("count() needs exactly one of ad_id= or advertiser=")


# --- SQLite ---------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions (
    user_key   TEXT NOT NULL,
    ad_id      TEXT NOT NULL,
    advertiser TEXT NOT NULL,
    ts         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS impressions_user_ad ON impressions (user_key, ad_id, ts);
CREATE INDEX IF NOT EXISTS impressions_user_adv ON impressions (user_key, advertiser, ts);
CREATE INDEX IF NOT EXISTS impressions_ts ON impressions (ts);
"""


class SQLiteCapStore:
    """Caps in one SQLite file. Reopens its connection after a fork."""

    PRUNE_EVERY = 1000  # reservations between deletions of all expired rows

    def __init__(self, path: Path | str, *, config: CapConfig, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.config = config
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._since_prune = 0
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            conn = self._connection()
            conn.executescript(_SCHEMA)
            if "pending" not in {row[1] for row in conn.execute("PRAGMA table_info(impressions)")}:
                conn.execute("ALTER TABLE impressions ADD COLUMN pending INTEGER NOT NULL DEFAULT 0")

    # an impression counts while in the window, and — when still pending a render — within the grace time
    _COUNTS = "ts>? AND (pending=0 OR ts>?)"

    def _since(self, now: float) -> tuple[float, float]:
        return now - self.config.window_s, now - self.config.render_grace_s

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = connect_wal(self.path, busy_timeout_s=self.busy_timeout_s, synchronous="NORMAL")
            self._pid = os.getpid()
        return self._conn

    def try_reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> bool:
        return self.reserve(user_key, ad_id, advertiser, now=now) is not None

    def reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> Reservation | None:
        now = time.time() if now is None else now
        cutoff = now - self.config.window_s
        cfg = self.config
        row_id: int | None = None
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    allowed = True
                    if cfg.max_per_ad is not None:
                        (n,) = conn.execute(
                            f"SELECT count(*) FROM impressions WHERE user_key=? AND ad_id=? AND {self._COUNTS}",
                            (user_key, ad_id, *self._since(now)),
                        ).fetchone()
                        allowed = n < cfg.max_per_ad
                    if allowed and advertiser and cfg.max_per_advertiser is not None:
                        (n,) = conn.execute(
                            f"SELECT count(*) FROM impressions WHERE user_key=? AND advertiser=? AND {self._COUNTS}",
                            (user_key, advertiser, *self._since(now)),
                        ).fetchone()
                        allowed = n < cfg.max_per_advertiser
                    if allowed:
                        conn.execute("DELETE FROM impressions WHERE user_key=? AND ts<=?", (user_key, cutoff))
                        row_id = conn.execute(
                            "INSERT INTO impressions (user_key, ad_id, advertiser, ts, pending) VALUES (?, ?, ?, ?, ?)",
                            (user_key, ad_id, advertiser, now, int(cfg.count_rendered)),
                        ).lastrowid
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                self._since_prune += 1
                if self._since_prune >= self.PRUNE_EVERY:
                    self._since_prune = 0
                    conn.execute("DELETE FROM impressions WHERE ts<=?", (cutoff,))
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e
        return Reservation(user_key, ad_id, advertiser, str(row_id)) if allowed else None

    # reserve_many reads the user's impressions in the window with one scan when they are at most this many
    # per item checked, else the counts of the items' ads and advertisers through the indexes (IN lists)
    SCAN_ROWS_PER_ITEM = 2

    def reserve_many(
        self, user_key: str, items: list[tuple[str, str]], *, limit: int, now: float | None = None
    ) -> list[Reservation | None]:
        """`reserve()` for each (ad_id, advertiser) in order until `limit` are reserved, in one `BEGIN IMMEDIATE`
        transaction (WAL, synchronous=NORMAL: durable at the next checkpoint, never corrupt): one write lock
        per request, and the checks see the reservations made earlier in the same call.

        Statements: the user's expired rows deleted, the counts read (one scan of the user's rows in the window;
        two indexed queries instead when the user has more rows than SCAN_ROWS_PER_ITEM per item), one INSERT
        of every reservation (RETURNING its row id). A pending reservation (cap_count=rendered) counts within
        the render grace time, as in `reserve()`."""
        now = time.time() if now is None else now
        cutoff = now - self.config.window_s
        cfg = self.config
        pending = int(cfg.count_rendered)
        counted = not pending or cfg.render_grace_s > 0  # this call's own rows count for its later items
        verdicts: list[int | None] = []  # per item examined: its index in `todo`, or None (capped)
        todo: list[tuple[str, str]] = []
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("DELETE FROM impressions WHERE user_key=? AND ts<=?", (user_key, cutoff))
                    per_ad, per_adv = self._window_counts(conn, user_key, items, now) if items and limit > 0 else ({}, {})
                    for ad_id, advertiser in items:
                        if len(todo) >= limit:
                            break
                        allowed = True
                        if cfg.max_per_ad is not None:
                            allowed = per_ad.get(ad_id, 0) < cfg.max_per_ad
                        if allowed and advertiser and cfg.max_per_advertiser is not None:
                            allowed = per_adv.get(advertiser, 0) < cfg.max_per_advertiser
                        if not allowed:
                            verdicts.append(None)
                            continue
                        verdicts.append(len(todo))
                        todo.append((ad_id, advertiser))
                        if counted:
                            per_ad[ad_id] = per_ad.get(ad_id, 0) + 1
                            if advertiser:
                                per_adv[advertiser] = per_adv.get(advertiser, 0) + 1
                    row_ids = self._insert(conn, user_key, todo, now=now, pending=pending) if todo else []
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                self._since_prune += max(1, len(verdicts))
                if self._since_prune >= self.PRUNE_EVERY:
                    self._since_prune = 0
                    conn.execute("DELETE FROM impressions WHERE ts<=?", (cutoff,))
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e
        return [None if i is None else Reservation(user_key, todo[i][0], todo[i][1], str(row_ids[i])) for i in verdicts]

    def _window_counts(
        self, conn: sqlite3.Connection, user_key: str, items: list[tuple[str, str]], now: float
    ) -> tuple[dict[str, int], dict[str, int]]:
        """({ad_id: rows}, {advertiser: rows}) of this user that count now, for (at least) the items' ads and
        advertisers (absent: 0)."""
        since = self._since(now)
        bound = self.SCAN_ROWS_PER_ITEM * len(items)
        rows = conn.execute(
            f"SELECT ad_id, advertiser FROM impressions WHERE user_key=? AND {self._COUNTS} LIMIT ?", (user_key, *since, bound + 1)
        ).fetchall()
        if len(rows) <= bound:
            per_ad: dict[str, int] = {}
            per_adv: dict[str, int] = {}
            for ad_id, advertiser in rows:
                per_ad[ad_id] = per_ad.get(ad_id, 0) + 1
                if advertiser:
                    per_adv[advertiser] = per_adv.get(advertiser, 0) + 1
            return per_ad, per_adv
        cfg = self.config
        per_ad = self._counts(conn, user_key, "ad_id", [a for a, _ in items], since) if cfg.max_per_ad is not None else {}
        per_adv = self._counts(conn, user_key, "advertiser", [v for _, v in items if v], since) if cfg.max_per_advertiser is not None else {}
        return per_ad, per_adv

    @classmethod
    def _counts(cls, conn: sqlite3.Connection, user_key: str, column: str, values: list[str], since: tuple[float, float]) -> dict[str, int]:
        """{value: rows of this user with `column` = value that count now} for the distinct `values` (absent: 0)."""
        distinct = list(dict.fromkeys(values))
        if not distinct:
            return {}
        marks = ",".join("?" * len(distinct))
        sql = f"SELECT {column}, count(*) FROM impressions WHERE user_key=? AND {column} IN ({marks}) AND {cls._COUNTS} GROUP BY {column}"
        return dict(conn.execute(sql, (user_key, *distinct, *since)).fetchall())

    returning = sqlite3.sqlite_version_info >= (3, 35)  # INSERT ... RETURNING exists (an instance may turn it off)

    def _insert(self, conn: sqlite3.Connection, user_key: str, todo: list[tuple[str, str]], *, now: float, pending: int) -> list[int]:
        """One INSERT of every (ad_id, advertiser) in `todo`; their row ids in `todo` order. RETURNING's row order
        is not guaranteed: ids are matched back by ad id (rows of one ad are identical, so any match is right)."""
        if not self.returning:  # no RETURNING before SQLite 3.35 (e.g. Debian 11): one INSERT per row
            insert = "INSERT INTO impressions (user_key, ad_id, advertiser, ts, pending) VALUES (?,?,?,?,?)"
            return [conn.execute(insert, (user_key, ad_id, advertiser, now, pending)).lastrowid for ad_id, advertiser in todo]
        sql = "INSERT INTO impressions (user_key, ad_id, advertiser, ts, pending) VALUES " + ",".join(["(?,?,?,?,?)"] * len(todo))
        args = [x for ad_id, advertiser in todo for x in (user_key, ad_id, advertiser, now, pending)]
        ids: dict[str, list[int]] = {}
        for row_id, ad_id in conn.execute(sql + " RETURNING rowid, ad_id", args).fetchall():
            ids.setdefault(ad_id, []).append(row_id)
        return [ids[ad_id].pop() for ad_id, _ in todo]

    def release(self, reservation: Reservation) -> None:
        try:
            with self._lock:
                self._connection().execute(
                    "DELETE FROM impressions WHERE rowid=? AND user_key=? AND ad_id=?",
                    (int(reservation.token), reservation.user_key, reservation.ad_id),
                )
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        _one_of(ad_id, advertiser)
        now = time.time() if now is None else now
        column, value = ("ad_id", ad_id) if ad_id is not None else ("advertiser", advertiser)
        try:
            with self._lock:
                (n,) = self._connection().execute(
                    f"SELECT count(*) FROM impressions WHERE user_key=? AND {column}=? AND {self._COUNTS}",
                    (user_key, value, *self._since(now)),
                ).fetchone()
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e
        return int(n)

    def confirm_render(self, *, user_key: str, ad_id: str, advertiser: str, reservation_id: str, reserved_at: float) -> None:
        """cap_count=rendered: the ad was rendered; its oldest pending reservation becomes a counted impression
        (selection.feedback.RenderHook; called once per rendered (request, ad))."""
        try:
            with self._lock:
                self._connection().execute(
                    "UPDATE impressions SET pending=0 WHERE rowid=(SELECT rowid FROM impressions"
                    " WHERE user_key=? AND ad_id=? AND pending=1 ORDER BY ts LIMIT 1)",
                    (user_key, ad_id),
                )
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e

    def prune(self, *, now: float | None = None) -> int:
        """Delete all expired impressions; returns how many."""
        now = time.time() if now is None else now
        try:
            with self._lock:
                cur = self._connection().execute(
                    "DELETE FROM impressions WHERE ts<=?", (now - self.config.window_s,)
                )
                return cur.rowcount
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


# --- Redis ----------------------------------------------------------------------------------------

# KEYS[1] per-ad set, KEYS[2] per-advertiser set (absent when the ad has no advertiser).
# ARGV: now and cutoff (score strings), max_per_ad (-1 = none), max_per_advertiser (-1 = none), member, ttl_ms.
_RESERVE_LUA = """
local now, cutoff = ARGV[1], ARGV[2]
local max_ad, max_adv = tonumber(ARGV[3]), tonumber(ARGV[4])
local member, ttl = ARGV[5], tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
if max_ad >= 0 and redis.call('ZCARD', KEYS[1]) >= max_ad then return 0 end
if #KEYS > 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if max_adv >= 0 and redis.call('ZCARD', KEYS[2]) >= max_adv then return 0 end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 1
"""

# Many reservations in order in one call. KEYS: per item its per-ad key, then its per-advertiser key when it has one.
# ARGV: now, cutoff, max_ad, max_adv, ttl_ms, limit, then per item: key count (1 or 2), member.
# Returns one 1 (reserved) or 0 (capped) per item examined; stops once `limit` are reserved.
_RESERVE_MANY_LUA = """
local now, cutoff = ARGV[1], ARGV[2]
local max_ad, max_adv = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local out, k, reserved, a = {}, 1, 0, 7
while a <= #ARGV do
  if reserved >= limit then break end
  local nkeys, member = tonumber(ARGV[a]), ARGV[a + 1]
  local ok = true
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', cutoff)
  if max_ad >= 0 and redis.call('ZCARD', KEYS[k]) >= max_ad then ok = false end
  if ok and nkeys > 1 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', cutoff)
    if max_adv >= 0 and redis.call('ZCARD', KEYS[k + 1]) >= max_adv then ok = false end
  end
  if ok then
    for i = k, k + nkeys - 1 do
      redis.call('ZADD', KEYS[i], now, member)
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
    reserved = reserved + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  k = k + nkeys
  a = a + 2
end
return out
"""


class RedisCapStore:
    """Caps in Redis sorted sets; pass any `redis.Redis` client (sync).

    After a failed call the store raises `CapStoreError` at once for `retry_after_s` (then one call tries
    again), so a dead Redis costs one socket timeout per period, not one per request. A reservation whose
    call failed may still have been applied (the reply was lost): it is given back on the next call that
    reaches Redis, so the counts stay exact across an outage.
    """

    def __init__(self, client: Any, *, config: CapConfig, prefix: str = "adselect:caps", retry_after_s: float = 1.0):
        from agent.breaker import CircuitBreaker

        self.client = client
        self.config = config
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE_LUA)
        self._reserve_many = client.register_script(_RESERVE_MANY_LUA)
        self._health = CircuitBreaker(1, retry_after_s, name="caps")
        self._unsure: collections.deque[Reservation] = collections.deque(maxlen=100_000)
        self._unsure_lock = threading.Lock()

    def _ad_key(self, user_key: str, ad_id: str) -> str:
        return f"{self.prefix}:{{{user_key}}}:ad:{ad_id}"

    def _adv_key(self, user_key: str, advertiser: str) -> str:
        return f"{self.prefix}:{{{user_key}}}:adv:{advertiser}"

    def _keys(self, r: Reservation) -> list[str]:
        return [self._ad_key(r.user_key, r.ad_id)] + ([self._adv_key(r.user_key, r.advertiser)] if r.advertiser else [])

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one Redis call behind the health breaker; RedisError becomes CapStoreError."""
        import redis

        if not self._health.allow():
            raise CapStoreError("cap store redis: unavailable (a recent call failed)")
        try:
            self._give_back_unsure()
            out = fn()
        except redis.RedisError as e:
            self._health.record_failure()
            raise CapStoreError(f"cap store redis: {type(e).__name__}") from e
        except BaseException:
            self._health.release_probe()
            raise
        self._health.record_success()
        return out

    def _give_back_unsure(self) -> None:
        with self._unsure_lock:
            pending = list(self._unsure)
            self._unsure.clear()
        try:
            for r in pending:
                self._zrem(r)
        except BaseException:
            with self._unsure_lock:
                self._unsure.extend(pending)
            raise

    def _zrem(self, r: Reservation) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key in self._keys(r):
            pipe.zrem(key, r.token)
        pipe.execute()

    def try_reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> bool:
        return self.reserve(user_key, ad_id, advertiser, now=now) is not None

    def reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> Reservation | None:
        now = time.time() if now is None else now
        cfg = self.config
        r = Reservation(user_key, ad_id, advertiser, f"{now!r}:{uuid.uuid4().hex}")
        args = [
            repr(float(now)),
            repr(float(now - cfg.window_s)),
            -1 if cfg.max_per_ad is None else cfg.max_per_ad,
            -1 if cfg.max_per_advertiser is None else cfg.max_per_advertiser,
            r.token,
            max(1, math.ceil(cfg.window_s * 1000)),
        ]
        try:
            ok = self._call(lambda: self._reserve(keys=self._keys(r), args=args))
        except CapStoreError as e:
            if isinstance(e.__cause__, Exception):  # the script may have run: give it back once Redis answers
                with self._unsure_lock:
                    self._unsure.append(r)
            raise
        return r if int(ok) else None

    def reserve_many(
        self, user_key: str, items: list[tuple[str, str]], *, limit: int, now: float | None = None
    ) -> list[Reservation | None]:
        """`reserve()` for each (ad_id, advertiser) in order until `limit` are reserved, in one script call."""
        now = time.time() if now is None else now
        cfg = self.config
        pending = [Reservation(user_key, a, adv, f"{now!r}:{uuid.uuid4().hex}") for a, adv in items]
        keys: list[str] = []
        args: list[Any] = [
            repr(float(now)),
            repr(float(now - cfg.window_s)),
            -1 if cfg.max_per_ad is None else cfg.max_per_ad,
            -1 if cfg.max_per_advertiser is None else cfg.max_per_advertiser,
            max(1, math.ceil(cfg.window_s * 1000)),
            limit,
        ]
        for r in pending:
            k = self._keys(r)
            keys += k
            args += [len(k), r.token]
        try:
            got = self._call(lambda: self._reserve_many(keys=keys, args=args))
        except CapStoreError as e:
            if isinstance(e.__cause__, Exception):  # the script may have run: give all of it back once Redis answers
                with self._unsure_lock:
                    self._unsure.extend(pending)
            raise
        return [r if int(ok) else None for r, ok in zip(pending, got)]

    def release(self, reservation: Reservation) -> None:
        try:
            self._call(lambda: self._zrem(reservation))
        except CapStoreError:  # given back on the next call that reaches Redis
            with self._unsure_lock:
                self._unsure.append(reservation)
            raise

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        _one_of(ad_id, advertiser)
        now = time.time() if now is None else now
        key = self._ad_key(user_key, ad_id) if ad_id is not None else self._adv_key(user_key, advertiser or "")
        return int(self._call(lambda: self.client.zcount(key, f"({float(now - self.config.window_s)!r}", "+inf")))

    def close(self) -> None:
        self.client.close()


def open_cap_store(settings, *, redis_client: Any | None = None) -> CapStore:
    """Redis when ADSELECT_REDIS_URL is set (or a client is injected), else SQLite under data_dir."""
    config = CapConfig.from_settings(settings)
    if (redis_client is not None or settings.redis_url) and config.count_rendered:
        from kernel.errors import ConfigError

        raise ConfigError("ADSELECT_CAP_COUNT", "rendered needs the SQLite cap store (not implemented for Redis)")
    if redis_client is not None or settings.redis_url:
        if redis_client is None:
            from selection.redis_client import redis_from_settings

            redis_client = redis_from_settings(settings)
        return RedisCapStore(redis_client, config=config)
    return SQLiteCapStore(Path(settings.data_dir) / "caps.sqlite", config=config)
