"""Log lines a machine can read: one JSON object per record (python-json-logger), with every `extra=` field
of the logging call (request id, breaker state, failure reason, latencies, ...) as a key of its own.

Configured by the entry points (`adselect …`, `adselect serve`), never at import time: a library that
imports this package keeps whatever logging its host set up. uvicorn is run with `log_config=None`, so its
own records (access log included) reach the same root handler.

    {"time": "2025-05-01T10:00:00.123+00:00", "level": "INFO", "logger": "agent.breaker",
     "message": "circuit opened", "breaker": "llm", "consecutive_failures": 5, "reset_after_s": 30.0}
"""
from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from datetime import datetime, timezone
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _Json(JsonFormatter):
    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["time"] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        log_record["level"] = record.levelname
        log_record["logger"] = record.name


def json_formatter() -> logging.Formatter:
    """Message plus every extra field; exceptions as `exc_info` text."""
    return _Json("%(message)s", json_ensure_ascii=False)


def configure_logging(*, level: int = logging.INFO, fmt: LogFormat = "json", stream: IO[str] | None = None) -> logging.Handler:
    """Route every record to one handler on `stream` (stderr) in `fmt`; replaces the root's handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class BoundedQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a writer thread through a bounded queue, never blocking the caller: when the queue
    is full the record is dropped and counted (`dropped`, exported as adselect_log_records_dropped)."""

    def __init__(self, size: int):
        super().__init__(queue.Queue(maxsize=size))
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1  # under the GIL; a lost increment only under-counts drops, never blocks


def queue_logging(*, size: int) -> BoundedQueueHandler:
    """Moves the root's handlers (what configure_logging installed) behind one bounded queue and a writer
    thread: the request path only enqueues; formatting (JSON) and the write happen on the writer thread.
    The queue is drained at interpreter exit, so every record accepted is written."""
    root = logging.getLogger()
    targets = list(root.handlers)
    for h in targets:
        root.removeHandler(h)
    front = BoundedQueueHandler(size)
    listener = logging.handlers.QueueListener(front.queue, *targets, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)  # stop() enqueues a sentinel and joins: what was queued is written first
    root.addHandler(front)
    return front


def dropped_log_records() -> int:
    """Records refused by a full log queue since start (0 without queue_logging)."""
    return sum(h.dropped for h in logging.getLogger().handlers if isinstance(h, BoundedQueueHandler))
