"""Log lines a machine can read: JSON objects carrying the `extra=` fields, set up by the entry point only."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.breaker import CircuitBreaker
from server.logs import configure_logging

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger configured as `adselect` configures it, writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging(stream=buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)


def test_a_real_component_logs_its_extra_fields_as_json(json_log: io.StringIO):
    breaker = CircuitBreaker(2, 30.0)
    breaker.record_failure()
    breaker.record_failure()  # opens: agent.breaker logs a warning with breaker, consecutive_failures, reset_after_s
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    opened = [r for r in records if r["logger"] == "agent.breaker" and r["level"] == "WARNING"]
    assert opened, records
    assert opened[0]["consecutive_failures"] == 2 and opened[0]["reset_after_s"] == 30.0 and "breaker" in opened[0]
    assert {"time", "message"} <= set(opened[0])


def test_exceptions_and_request_fields_stay_one_json_line(json_log: io.StringIO):
    try:
        raise KeyError("boom")
    except KeyError:
        logging.getLogger("server.test").exception("failed", extra={"request_id": "r-1", "latency_ms": 12.5})
    (line,) = json_log.getvalue().splitlines()
    record = json.loads(line)
    assert (record["request_id"], record["latency_ms"], record["level"]) == ("r-1", 12.5, "ERROR")
    assert "KeyError" in record["exc_info"]


def test_importing_the_service_configures_no_logging():
    code = "import logging, adselect.cli, server.app, selection.services; print(len(logging.getLogger().handlers))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
