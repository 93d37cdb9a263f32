"""The impression log: one JSON object per served decision, appended to rotated JSONL files.

A record extends the canonical impression format of the shared data (`impression_id`, `user_id`,
`timestamp`, `history`, `candidates`, `clicked`) so `adselect eval` reads the log as it reads the public
files; the extra fields say what was served, why and with what probability (`build_record`, schema below).

Writing (`JsonlImpressionLog`):
- `write(record)` serialises the record in the caller's thread and appends one line to a bounded
  in-memory queue without ever blocking or waking another thread: when the queue is full the record is
  **dropped and counted** (`stats().dropped`), so a slow disk costs log records, never request latency.
  Safe from any thread and from the event loop.
- One writer thread wakes every `poll_s` (default 50 ms; at once on `flush`/`close`), drains the queue and
  appends each batch with a single `os.write` on an `O_APPEND` descriptor. (Waking it per record would
  hand the GIL over on every request: measured ~2 ms per write on a loaded 2-core machine.) A killed process therefore leaves only whole lines, except possibly one torn line at the end
  of its last file; fsync (`fsync="always" | "interval" | "never"`) decides what survives power loss.
- Every writer opens a fresh file (name: UTC start time, pid, sequence) and never appends to an old one,
  so a torn line can only be the last line of a file. Files rotate by size and by age.
- `flush()` waits until everything queued so far is written; `close()` drains the queue, fsyncs
  (unless `never`) and stops the thread.

Reading (`iter_log_records(dir)`): the files in name order (= creation order per process), one dict per
line. A last line without its newline is torn: skipped and counted (`LogReadStats.torn`), never raised.
A malformed line that is not the last of its file is corruption: `DataFileError` with file and line.

Record schema (`SCHEMA_VERSION` 1; lists under `served_ads` are in served order):
    impression_id: str                  the caller's impression id when the request gave one, else the request id
    request_id: str                     the service's id of the decision (feedback events name it)
    user_id: str                        the keyed user hash (kernel.hashing.user_key), never the raw id
    timestamp: str                      ISO-8601 UTC of the decision, e.g. "2024-05-01T12:00:00.123Z"
    history: [ad_id]                    oldest first; [] when the user did not consent to personalisation
    events: [str]                       keyed hashes of the free-text events (raw text is never stored)
    candidates: [ad_id]                 the scored candidates, in prior order
    scored: [{ad_id, priors: {feature: value}, score?, pctr?}]   per scored candidate, same order
    served: [ad_id]                     the served ids, in order
    served_ads: [{ad_id, position, propensity, pctr, bid, score}]
        propensity = P(this ad at this position | the ads above it) under the serving policy (1.0 when
        nothing was randomised); slate_propensity = their product = P(this exact served list)
    slate_propensity: float
    exploration: {method, ...} | None   the exploration config that served it
    arm: str                            the experiment arm ("default" without experiments)
    weights_version, prompt_sha256, model: str | None
    llm_used: bool, degraded_reason: str | None, personalized: bool
    clicked: []                         filled later from feedback (selection.feedback.FeedbackStore.join)
    schema: int
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

from kernel.errors import DataFileError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_PREFIX = "impressions-"
FILE_SUFFIX = ".jsonl"
FsyncPolicy = Literal["always", "interval", "never"]
_BATCH_MAX = 512  # lines per os.write


class ImpressionLogWriter(Protocol):
    """Where served decisions go. `write` must never block the request; `close` drains."""

    def write(self, record: Mapping[str, Any]) -> bool:
        """Queue one record; True if accepted, False if dropped (counted)."""
        ...

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record accepted so far is written; False on timeout."""
        ...

    def close(self, timeout_s: float | None = None) -> None: ...

    def stats(self) -> "LogWriterStats": ...


@dataclass(frozen=True, slots=True)
class LogWriterStats:
    accepted: int = 0  # records put on the queue
    written: int = 0  # records the writer thread wrote to a file
    dropped: int = 0  # records refused: queue full, or the log closed
    failed: int = 0  # records lost to an OS error while writing (logged)
    files: int = 0  # files opened by this writer
    queued: int = 0  # records waiting now


class NullImpressionLog:
    """Logging off: accepts nothing, costs nothing."""

    def write(self, record: Mapping[str, Any]) -> bool:
        return False

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self, timeout_s: float | None = None) -> None:
        return None

    def stats(self) -> LogWriterStats:
        return LogWriterStats()


class JsonlImpressionLog:
    """Append-only rotated JSONL files under `directory`, written by one background thread."""

    def __init__(
        self,
        directory: Path | str,
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 3600.0,
        queue_size: int = 10000,
        poll_s: float = 0.05,
    ):
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be always|interval|never, not {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.queue_size = queue_size
        self.poll_s = poll_s
        self._queue: deque = deque()  # lines (bytes) and flush tokens (Events), under self._lock
        self._wake = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()  # counters
        self._accepted = self._written = self._dropped = self._failed = self._files = 0
        self._closed = False
        self._fd: int | None = None
        self._size = 0
        self._opened_at = 0.0
        self._last_fsync = 0.0
        self._seq = 0
        self._current: Path | None = None
        self._dirty = False  # written since the last fsync (never True under fsync="never")
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings) -> "JsonlImpressionLog":
        directory = settings.impression_log_dir or Path(settings.data_dir) / "impressions"
        return cls(
            directory,
            fsync=settings.impression_log_fsync,
            fsync_interval_s=settings.impression_log_fsync_interval_s,
            max_bytes=settings.impression_log_max_bytes,
            max_age_s=settings.impression_log_max_age_s,
            queue_size=settings.impression_log_queue_size,
        )

    # ---- caller side -----------------------------------------------------------------------
    def write(self, record: Mapping[str, Any]) -> bool:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            if self._closed or len(self._queue) >= self.queue_size:
                self._dropped += 1
                dropped = self._dropped
                closed = self._closed
            else:
                self._queue.append(line)
                self._accepted += 1
                return True
        if not closed and dropped & (dropped - 1) == 0:  # 1, 2, 4, 8, ...: visible without flooding the log
            log.warning("impression log queue full: record dropped", extra={"dropped_total": dropped})
        return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record accepted before this call is written (and fsynced unless `never`)."""
        done = threading.Event()
        with self._lock:
            if not self._thread.is_alive():
                return not self._queue
            self._queue.append(done)
        self._wake.set()
        return done.wait(timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new records, write every queued one, fsync (unless `never`), stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("impression log writer did not finish in time", extra={"queued": len(self._queue)})

    def stats(self) -> LogWriterStats:
        with self._lock:
            return LogWriterStats(
                accepted=self._accepted,
                written=self._written,
                dropped=self._dropped,
                failed=self._failed,
                files=self._files,
                queued=sum(1 for x in self._queue if isinstance(x, bytes)),
            )

    @property
    def current_file(self) -> Path | None:
        return self._current

    # ---- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug here must not pass silently: every later record would be lost
            log.exception("impression log writer stopped")
            raise
        finally:
            self._close_file()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            stopping = self._stopping  # read before draining: whatever was queued before close() is written
            self._drain()
            if self._dirty and self.fsync == "interval" and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
                self._sync()
            if stopping and not self._queue:
                return

    def _drain(self) -> None:
        with self._lock:  # take the whole queue at once: callers never wait behind the writer's work
            items, self._queue = self._queue, deque()
        batch: list[bytes] = []
        for item in items:
            if isinstance(item, bytes):
                batch.append(item)
                if len(batch) < _BATCH_MAX:
                    continue
                self._write_batch(batch)
                batch = []
            else:  # a flush token: everything queued before it is written (and fsynced) first
                if batch:
                    self._write_batch(batch)
                    batch = []
                if self._dirty:
                    self._sync()
                item.set()
        if batch:
            self._write_batch(batch)
        if self._dirty and self.fsync == "always":
            self._sync()

    def _write_batch(self, batch: list[bytes]) -> None:
        data = b"".join(batch)
        try:
            self._maybe_rotate(len(data))
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)  # type: ignore[arg-type]
                view = view[n:]
            self._size += len(data)
            self._dirty = self.fsync != "never"
        except OSError:
            log.exception("impression log write failed", extra={"records": len(batch), "file": str(self._current)})
            with self._lock:
                self._failed += len(batch)
            self._close_file()  # the next batch opens a fresh file
            return
        with self._lock:
            self._written += len(batch)

    def _maybe_rotate(self, incoming: int) -> None:
        if self._fd is not None:
            too_big = self._size > 0 and self._size + incoming > self.max_bytes
            too_old = time.monotonic() - self._opened_at >= self.max_age_s
            if not (too_big or too_old):
                return
            self._close_file()
        self._open_file()

    def _open_file(self) -> None:
        self._seq += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.directory / f"{FILE_PREFIX}{stamp}-{os.getpid()}-{self._seq:06d}{FILE_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o640)
        self._current = path
        self._size = 0
        self._opened_at = time.monotonic()
        with self._lock:
            self._files += 1
        if self.fsync != "never":  # the new directory entry survives power loss too
            _fsync_dir(self.directory)

    def _sync(self) -> None:
        self._dirty = False
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)  # type: ignore[arg-type]
        except OSError:
            log.exception("impression log fsync failed", extra={"file": str(self._current)})
        self._last_fsync = time.monotonic()

    def _close_file(self) -> None:
        if self._fd is None:
            return
        if self._dirty:
            self._sync()
        try:
            os.close(self._fd)
        except OSError:
            log.exception("impression log close failed", extra={"file": str(self._current)})
        self._fd = None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class LogReadStats:
    files: int = 0
    records: int = 0
    torn: int = 0  # last lines without their newline, skipped
    torn_files: list[str] = field(default_factory=list)


def log_files(directory: Path | str) -> list[Path]:
    """The log's files in creation order (their names start with the UTC time they were opened)."""
    return sorted(Path(directory).glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))


def iter_log_records(directory: Path | str, *, stats: LogReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every whole record under `directory`, file by file in creation order; a torn last line is counted, not raised."""
    stats = stats if stats is not None else LogReadStats()
    for path in log_files(directory):
        stats.files += 1
        with path.open("rb") as fh:
            data = fh.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else the torn last line
        if tail:
            stats.torn += 1
            stats.torn_files.append(str(path))
            log.warning("impression log: torn last line skipped", extra={"file": str(path), "bytes": len(tail)})
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataFileError(str(path), lineno, f"malformed log record ({e})") from None
            if not isinstance(obj, dict):
                raise DataFileError(str(path), lineno, "each log line must be a JSON object")
            stats.records += 1
            yield obj


# ---- building a record -----------------------------------------------------------------------


def event_hashes(events: Sequence[str], *, secret: bytes) -> list[str]:
    """Keyed hashes (HMAC-SHA256, hex) of free-text events: the log can tell events apart, never read them."""
    return [hmac.new(secret, e.encode("utf-8"), hashlib.sha256).hexdigest() for e in events]


def iso_utc(now: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z; a naive datetime is taken as UTC."""
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc).replace(tzinfo=None)
    return now.isoformat(timespec="milliseconds") + "Z"


@dataclass(frozen=True, slots=True)
class ServedEntry:
    """One served ad as the log keeps it."""

    ad_id: str
    propensity: float = 1.0  # P(this ad at this position | the ads above it)
    pctr: float | None = None
    bid: float | None = None
    score: float | None = None


@dataclass(frozen=True, slots=True)
class ScoredEntry:
    """One scored candidate: its prior features and, when known, its fused score and pCTR."""

    ad_id: str
    priors: Mapping[str, float]
    score: float | None = None
    pctr: float | None = None


def build_record(
    *,
    request_id: str,
    user_key: str,
    now: datetime,
    impression_id: str | None = None,
    history: Sequence[str],
    event_hashes: Sequence[str],
    scored: Sequence[ScoredEntry],
    served: Sequence[ServedEntry],
    arm: str = "default",
    exploration: Mapping[str, Any] | None = None,
    weights_version: str | None = None,
    prompt_sha256: str | None = None,
    model: str | None = None,
    llm_used: bool = False,
    degraded_reason: str | None = None,
    personalized: bool = True,
) -> dict[str, Any]:
    """The log record of one decision (schema in the module docstring). Without consent no history is kept."""
    slate = 1.0
    for s in served:
        if not 0.0 < s.propensity <= 1.0:
            raise ValueError(f"propensity of {s.ad_id!r} must be in (0, 1], got {s.propensity}")
        slate *= s.propensity
    return {
        "schema": SCHEMA_VERSION,
        "impression_id": impression_id or request_id,
        "request_id": request_id,
        "user_id": user_key,
        "timestamp": iso_utc(now),
        "history": list(history) if personalized else [],
        "events": list(event_hashes) if personalized else [],
        "candidates": [c.ad_id for c in scored],
        "scored": [_drop_none({"ad_id": c.ad_id, "priors": dict(c.priors), "score": c.score, "pctr": c.pctr}) for c in scored],
        "served": [s.ad_id for s in served],
        "served_ads": [
            {"ad_id": s.ad_id, "position": i, "propensity": s.propensity, "pctr": s.pctr, "bid": s.bid, "score": s.score}
            for i, s in enumerate(served)
        ],
        "slate_propensity": slate,
        "exploration": dict(exploration) if exploration is not None else None,
        "arm": arm,
        "weights_version": weights_version,
        "prompt_sha256": prompt_sha256,
        "model": model,
        "llm_used": llm_used,
        "degraded_reason": degraded_reason,
        "personalized": personalized,
        "clicked": [],
    }


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
