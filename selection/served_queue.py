"""What each decision served, handed to the feedback store off the request path.

`ServedQueue.put(...)` is a queue put (never blocks, never touches SQLite); one thread writes the rows
with `FeedbackStore.record_served_many`, what queued up meanwhile in one transaction. An event that arrives before its decision's row is written would look
"unknown": `record_event` then waits for the queue (`flush`) and tries once more, so a client that posts
a click right after its response is never refused for being fast.

A full queue drops the row (counted, logged): its events are then refused as unknown, never mis-joined.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

from kernel.errors import AdNotServed, UnknownRequest
from selection.feedback import FeedbackStore, Outcome, ServedAdRow, ServedDecision

log = logging.getLogger(__name__)


class ServedQueue:
    BATCH = 64  # rows queued meanwhile are written together, in one transaction (at most this many)

    def __init__(self, store: FeedbackStore, *, maxsize: int = 10000):
        self.store = store
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="served-rows", daemon=True)
        self._thread.start()

    def put(self, *, request_id: str, user_key: str, ads: Sequence[ServedAdRow], arm: str, now: float) -> bool:
        try:
            self._q.put_nowait(ServedDecision(request_id, user_key, tuple(ads), arm, now))
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("served-rows queue full: decision not remembered", extra={"request_id": request_id})
            return False

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every row queued so far is written (False on timeout)."""
        done = threading.Event()
        try:
            self._q.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def record_event(self, *, event_id: str, request_id: str, ad_id: str, type: str, value: float | None) -> Outcome:
        """`FeedbackStore.record`, retried once after the queue is written when the request looks unknown."""
        try:
            return self.store.record(event_id=event_id, request_id=request_id, ad_id=ad_id, type=type, value=value)
        except (UnknownRequest, AdNotServed):
            if not self.flush():
                raise
            return self.store.record(event_id=event_id, request_id=request_id, ad_id=ad_id, type=type, value=value)

    def _run(self) -> None:
        while True:
            items = [self._q.get()]
            while len(items) < self.BATCH:  # whatever queued up while the last batch was written
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            rows: list[ServedDecision] = []
            for item in items:  # in queue order: a flush token is set once the rows before it are written
                if isinstance(item, ServedDecision):
                    rows.append(item)
                    continue
                self._write(rows)
                rows = []
                if item is None:
                    return
                item.set()
            self._write(rows)

    def _write(self, rows: list[ServedDecision]) -> None:
        if not rows:
            return
        try:
            self.store.record_served_many(rows)
        except Exception:  # one at a time then: a bad row loses only itself
            for row in rows:
                try:
                    self.store.record_served_many([row])
                except Exception:
                    self.failed += 1
                    log.exception("served rows not written", extra={"request_id": row.request_id})

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._q.put(None)
        self._thread.join(timeout_s)
