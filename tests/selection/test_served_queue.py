"""The served-rows writer: rows that queued up while it was busy are written in one transaction, in order, and a
flush returns only once every row queued before it is in the store. A real SQLite feedback store."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from selection.feedback import FeedbackStore, ServedAdRow
from selection.served_queue import ServedQueue

T0 = 1_000_000.0


def test_rows_queued_meanwhile_are_written_in_one_transaction(tmp_path: Path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    begins: list[str] = []
    store._connection("NORMAL").set_trace_callback(lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)
    served = ServedQueue(store)
    try:
        with store._lock:  # the writer is busy (it waits for the store): 40 decisions queue up meanwhile
            for i in range(40):
                assert served.put(request_id=f"r{i}", user_key="u", ads=[ServedAdRow(f"ad{i}", "adv")], arm="a", now=T0 + i)
        assert served.flush(10.0)
        assert 1 <= len(begins) <= 2  # at most the first row alone (taken before the others queued), then one batch
    finally:
        served.close()
    with sqlite3.connect(tmp_path / "feedback.sqlite") as db:
        rows = db.execute("SELECT request_id, ad_id, ts FROM served_ads ORDER BY ts").fetchall()
    assert rows == [(f"r{i}", f"ad{i}", T0 + i) for i in range(40)]
    assert store.record(event_id="e1", request_id="r39", ad_id="ad39", type="click", now=T0 + 50) == "recorded"
