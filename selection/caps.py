"""Frequency caps: at most N impressions per user per ad, and M per user per advertiser, in a sliding window.

`CapStore.try_reserve()` checks both caps and records the impression in one atomic step, so parallel
requests for one user can never exceed a cap. An impression at time t counts while `t > now - window_s`.
An ad with an empty advertiser is checked against the per-ad cap only.

Two stores, same semantics:
- `SQLiteCapStore(path)`: embedded; WAL, one `BEGIN IMMEDIATE` transaction per reservation, so it is
  safe across threads (one connection behind a lock) and across processes (SQLite's write lock).
- `RedisCapStore(client)`: a Lua script over two sorted sets per reservation (score = time), each
  expiring `window_s` after its last write. Keys share a `{user_key}` hash tag (Redis Cluster safe).

`user_key` should be `kernel.hashing.user_key(user_id, secret=...)`, never a raw user id.
Store failures raise `CapStoreError` so the caller chooses between serving uncapped and not serving.
"""
from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kernel.errors import RuntimeFault

log = logging.getLogger(__name__)


class CapStoreError(RuntimeFault):
    """The frequency-cap store could not be read or written."""

    code = "cap_store_unavailable"


@dataclass(frozen=True, slots=True)
class CapConfig:
    max_per_ad: int | None = 3  # None: no per-ad cap
    max_per_advertiser: int | None = 10  # None: no per-advertiser cap
    window_s: float = 86_400.0

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
        )


class CapStore(Protocol):
    config: CapConfig

    def try_reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> bool:
        """Record an impression and return True if both caps allow it; else change nothing, return False."""
        ...

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        """Impressions in the window for this user and ad, or this user and advertiser (exactly one given)."""
        ...

    def close(self) -> None: ...


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

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switching to WAL needs an exclusive lock and SQLite answers BUSY at once, without the busy
        handler, when another process opens the same new file at that moment (workers starting together):
        retry until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                busy = getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def try_reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        cutoff = now - self.config.window_s
        cfg = self.config
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    allowed = True
                    if cfg.max_per_ad is not None:
                        (n,) = conn.execute(
                            "SELECT count(*) FROM impressions WHERE user_key=? AND ad_id=? AND ts>?",
                            (user_key, ad_id, cutoff),
                        ).fetchone()
                        allowed = n < cfg.max_per_ad
                    if allowed and advertiser and cfg.max_per_advertiser is not None:
                        (n,) = conn.execute(
                            "SELECT count(*) FROM impressions WHERE user_key=? AND advertiser=? AND ts>?",
                            (user_key, advertiser, cutoff),
                        ).fetchone()
                        allowed = n < cfg.max_per_advertiser
                    if allowed:
                        conn.execute("DELETE FROM impressions WHERE user_key=? AND ts<=?", (user_key, cutoff))
                        conn.execute(
                            "INSERT INTO impressions (user_key, ad_id, advertiser, ts) VALUES (?, ?, ?, ?)",
                            (user_key, ad_id, advertiser, now),
                        )
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
        return allowed

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        _one_of(ad_id, advertiser)
        now = time.time() if now is None else now
        column, value = ("ad_id", ad_id) if ad_id is not None else ("advertiser", advertiser)
        try:
            with self._lock:
                (n,) = self._connection().execute(
                    f"SELECT count(*) FROM impressions WHERE user_key=? AND {column}=? AND ts>?",
                    (user_key, value, now - self.config.window_s),
                ).fetchone()
        except sqlite3.Error as e:
            raise CapStoreError(f"cap store {self.path}: {e}") from e
        return int(n)

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


class RedisCapStore:
    """Caps in Redis sorted sets; pass any `redis.Redis` client (sync)."""

    def __init__(self, client: Any, *, config: CapConfig, prefix: str = "adselect:caps"):
        self.client = client
        self.config = config
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE_LUA)

    def _ad_key(self, user_key: str, ad_id: str) -> str:
        return f"{self.prefix}:{{{user_key}}}:ad:{ad_id}"

    def _adv_key(self, user_key: str, advertiser: str) -> str:
        return f"{self.prefix}:{{{user_key}}}:adv:{advertiser}"

    def try_reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> bool:
        import redis

        now = time.time() if now is None else now
        cfg = self.config
        keys = [self._ad_key(user_key, ad_id)]
        if advertiser:
            keys.append(self._adv_key(user_key, advertiser))
        args = [
            repr(float(now)),
            repr(float(now - cfg.window_s)),
            -1 if cfg.max_per_ad is None else cfg.max_per_ad,
            -1 if cfg.max_per_advertiser is None else cfg.max_per_advertiser,
            f"{now!r}:{uuid.uuid4().hex}",
            max(1, math.ceil(cfg.window_s * 1000)),
        ]
        try:
            return bool(int(self._reserve(keys=keys, args=args)))
        except redis.RedisError as e:
            raise CapStoreError(f"cap store redis: {e}") from e

    def count(
        self, user_key: str, *, ad_id: str | None = None, advertiser: str | None = None, now: float | None = None
    ) -> int:
        import redis

        _one_of(ad_id, advertiser)
        now = time.time() if now is None else now
        key = self._ad_key(user_key, ad_id) if ad_id is not None else self._adv_key(user_key, advertiser or "")
        try:
            return int(self.client.zcount(key, f"({float(now - self.config.window_s)!r}", "+inf"))
        except redis.RedisError as e:
            raise CapStoreError(f"cap store redis: {e}") from e

    def close(self) -> None:
        self.client.close()


def open_cap_store(settings, *, redis_client: Any | None = None) -> CapStore:
    """Redis when ADSELECT_REDIS_URL is set (or a client is injected), else SQLite under data_dir."""
    config = CapConfig.from_settings(settings)
    if redis_client is not None or settings.redis_url:
        if redis_client is None:
            import redis

            redis_client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        return RedisCapStore(redis_client, config=config)
    return SQLiteCapStore(Path(settings.data_dir) / "caps.sqlite", config=config)
