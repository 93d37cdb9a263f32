"""The feedback store: idempotent events checked against what was served, durable, joinable to the log."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kernel.errors import AdNotServed, EventIdConflict, UnknownRequest, UserError
from kernel.settings import Settings
from selection.feedback import FeedbackStore, ServedAdRow

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "feedback.sqlite", window_s=3600)
    s.record_served(request_id="r1", user_key="u1", ads=[ServedAdRow("a", "adv1", 2.0), ServedAdRow("b", "", 1.0)], arm="x", now=T0)
    yield s
    s.close()


def test_an_event_id_is_recorded_once_and_a_retry_is_a_duplicate(store: FeedbackStore) -> None:
    assert store.record(event_id="e1", request_id="r1", ad_id="a", type="click", now=T0 + 1) == "recorded"
    assert store.record(event_id="e1", request_id="r1", ad_id="a", type="click", now=T0 + 2) == "duplicate"
    assert len(store.events_for("r1")) == 1
    with pytest.raises(EventIdConflict):  # the same id with another payload is not a retry
        store.record(event_id="e1", request_id="r1", ad_id="b", type="click", now=T0 + 3)
    assert len(store.events_for("r1")) == 1


def test_unknown_request_and_ad_not_served_are_typed_user_errors(store: FeedbackStore) -> None:
    with pytest.raises(UnknownRequest) as e:
        store.record(event_id="e1", request_id="nope", ad_id="a", type="click", now=T0)
    assert isinstance(e.value, UserError) and e.value.code == "unknown_request_id"
    with pytest.raises(AdNotServed) as e2:
        store.record(event_id="e2", request_id="r1", ad_id="zzz", type="rendered", now=T0)
    assert isinstance(e2.value, UserError) and e2.value.code == "ad_not_served"
    with pytest.raises(UnknownRequest):  # older than the window
        store.record(event_id="e3", request_id="r1", ad_id="a", type="click", now=T0 + 3601)
    assert store.events_for("r1") == []
    for bad in (dict(type="view"), dict(type="conversion", value=float("nan")), dict(type="conversion", value=1e12)):
        with pytest.raises(UserError):
            store.record(event_id="e4", request_id="r1", ad_id="a", now=T0, **bad)


def test_join_fills_clicked_in_served_order_and_conversions(store: FeedbackStore) -> None:
    store.record_served(request_id="r2", user_key="u2", ads=[ServedAdRow("c")], now=T0)
    for i, (ad, typ, val) in enumerate(
        [("b", "click", None), ("a", "click", None), ("a", "click", None), ("a", "conversion", 5.0),
         ("a", "conversion", 2.5), ("b", "rendered", None)]
    ):
        store.record(event_id=f"e{i}", request_id="r1", ad_id=ad, type=typ, value=val, now=T0 + i)
    records = [{"request_id": "r1", "served": ["a", "b"], "clicked": []}, {"request_id": "r2", "served": ["c"], "clicked": []},
               {"request_id": "r3", "served": [], "clicked": []}]
    out = list(store.join(iter(records)))
    assert out[0]["clicked"] == ["a", "b"] and out[0]["rendered"] == ["b"]
    assert out[0]["conversions"] == {"a": 2} and out[0]["conversion_value"] == {"a": 7.5}
    assert [o["clicked"] for o in out[1:]] == [[], []]
    assert records[0]["clicked"] == []  # the input records are not changed
    totals = store.arm_totals()
    assert totals["x"] == {"decisions": 1, "served": 2, "rendered": 1, "clicks": 2, "conversions": 2, "revenue": 3.0}
    assert totals["default"]["decisions"] == 1 and totals["default"]["clicks"] == 0


class FakeCapConfirmations:
    """Stands in for a cap store in rendered mode: keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def confirm_render(self, **kw) -> None:
        self.calls.append(kw)


def test_the_first_rendered_event_of_an_ad_confirms_its_reservation_once(tmp_path: Path) -> None:
    hook = FakeCapConfirmations()
    s = FeedbackStore(tmp_path / "f.sqlite", on_rendered=hook)
    s.record_served(request_id="r1", user_key="u1", ads=[ServedAdRow("a", "adv1")], now=T0)
    s.record(event_id="e1", request_id="r1", ad_id="a", type="click", now=T0 + 1)
    assert hook.calls == []
    s.record(event_id="e2", request_id="r1", ad_id="a", type="rendered", now=T0 + 2)
    s.record(event_id="e2", request_id="r1", ad_id="a", type="rendered", now=T0 + 2)  # retry
    s.record(event_id="e3", request_id="r1", ad_id="a", type="rendered", now=T0 + 3)  # rendered again
    assert hook.calls == [dict(user_key="u1", ad_id="a", advertiser="adv1", reservation_id="r1", reserved_at=T0)]


def test_parallel_retries_of_one_event_store_it_once(store: FeedbackStore, tmp_path: Path) -> None:
    outcomes: list[str] = []
    other = FeedbackStore(store.path)  # a second connection, as a second worker process has

    def send(s: FeedbackStore) -> None:
        for _ in range(20):
            outcomes.append(s.record(event_id="same", request_id="r1", ad_id="a", type="click", now=T0 + 1))

    threads = [threading.Thread(target=send, args=(s,)) for s in (store, other, store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert sorted(outcomes).count("recorded") == 1 and len(outcomes) == 80
    assert len(store.events_for("r1")) == 1


CHILD = r"""
import sys, time
from selection.feedback import FeedbackStore, ServedAdRow
s = FeedbackStore(sys.argv[1])
s.record_served(request_id="r", user_key="u", ads=[ServedAdRow("a")])
i = 0
while True:
    s.record(event_id=f"e{i}", request_id="r", ad_id="a", type="click")
    print(i, flush=True)  # acknowledged
    i += 1
"""


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acked = -1
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            acked = int(line)
            if acked >= 100:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    s = FeedbackStore(path)
    ids = {e.event_id for e in s.events_for("r")}
    s.close()
    assert {f"e{i}" for i in range(acked + 1)} <= ids


def test_from_settings_lives_under_the_data_dir(tmp_path: Path) -> None:
    s = FeedbackStore.from_settings(Settings(_env_file=None, data_dir=tmp_path, feedback_synchronous="NORMAL"))
    assert s.path == tmp_path / "feedback.sqlite" and s.synchronous == "NORMAL"
    s.close()
