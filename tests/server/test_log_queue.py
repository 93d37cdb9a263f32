"""The serving log path (server.logs.queue_logging): a log call never waits for the writer; a full queue
drops and counts; every accepted record is written by interpreter exit. Run in child interpreters (the
root logger is process-wide state)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKED_WRITER = r"""
import io, json, logging, threading, sys
from server.logs import configure_logging, queue_logging, dropped_log_records

class FakeStuckStream(io.StringIO):
    "A stream whose first write waits until released (a disk or pipe that stopped draining)."
    def __init__(self):
        super().__init__(); self.release = threading.Event(); self.lines = 0
    def write(self, s):
        self.release.wait(); self.lines += s.count("\n"); return super().write(s)

stream = FakeStuckStream()
configure_logging(fmt="json", stream=stream)
front = queue_logging(size=4)
log = logging.getLogger("adselect.audit")
done = threading.Event()
def burst():
    for i in range(50):
        log.info(json.dumps({"i": i}))
    done.set()
t = threading.Thread(target=burst, daemon=True); t.start()
returned = done.wait(10)  # the writer is stuck: only a non-blocking enqueue lets the burst finish
dropped = dropped_log_records()
stream.release.set()
import atexit
atexit.register(lambda: sys.__stdout__.write(json.dumps({"returned": returned, "dropped": dropped, "lines": stream.lines}) + "\n"))
"""

DRAIN_AT_EXIT = r"""
import logging
from server.logs import configure_logging, queue_logging
configure_logging(fmt="json")
queue_logging(size=100_000)
for i in range(3000):
    logging.getLogger("adselect.audit").info("line %d", i)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)


def test_full_queue_drops_and_counts_without_blocking():
    out = _run(BLOCKED_WRITER)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["returned"] is True
    assert 50 - 4 - 1 <= got["dropped"] < 50  # at most the queue plus the record the writer holds got through


def test_every_accepted_record_is_written_by_exit():
    out = _run(DRAIN_AT_EXIT)
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
    assert [x["message"] for x in lines] == [f"line {i}" for i in range(3000)]
