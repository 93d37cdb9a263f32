"""Log lines a machine can read: one JSON object per record (python-json-logger), with every `extra=` field
of the logging call (request id, breaker state, failure reason, latencies, ...) as a key of its own.

Configured by the entry points (`adselect …`, `adselect serve`), never at import time: a library that
imports this package keeps whatever logging its host set up. uvicorn is run with `log_config=None`, so its
own records (access log included) reach the same root handler.

    {"time": "2025-05-01T10:00:00.123+00:00", "level": "INFO", "logger": "agent.breaker",
     "message": "circuit opened", "breaker": "llm", "consecutive_failures": 5, "reset_after_s": 30.0}
"""
from __future__ import annotations

import logging
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
