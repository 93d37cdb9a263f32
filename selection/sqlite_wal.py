"""Opening an SQLite file in WAL mode when several processes may open the same new file at once."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def connect_wal(path: Path | str, *, busy_timeout_s: float, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """An autocommit connection (`BEGIN` explicitly) in WAL mode, usable from any thread behind a lock.

    Switching to WAL needs an exclusive lock and SQLite answers BUSY at once, without the busy handler,
    when another process opens the same new file at that moment (workers starting together): retry until
    the busy timeout.
    """
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    conn.execute(f"PRAGMA synchronous={_level(synchronous)}")
    return conn


def set_synchronous(conn: sqlite3.Connection, level: str) -> None:
    conn.execute(f"PRAGMA synchronous={_level(level)}")


def _level(level: str) -> str:
    level = level.upper()
    if level not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"unknown SQLite synchronous level {level!r}")
    return level
