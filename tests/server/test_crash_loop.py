"""Crash proof: `adselect serve` (a subprocess, demo catalog) SIGKILLed mid-traffic and restarted.

With `impression_log_sync` (durable before acknowledged): every acknowledged event is still there (a retry is
answered "duplicate", and the store holds it), no log record is torn where a reader fails (a torn last line is
counted and skipped), and decisions acknowledged ⊆ log records ⊆ audit lines, the counts apart by at most the one
request in flight at the kill. The restarted service serves and takes events on the same data."""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx

from eval.ope_http import ServiceProcess
from selection.feedback import FeedbackStore
from selection.impression_log import LogReadStats, iter_log_records

HISTORY = ["run-001", "run-004", "run-009"]


def audit_ids(proc: ServiceProcess) -> list[str]:
    """Request ids of the successful audit lines in the server's JSON log (stderr)."""
    out = []
    for line in proc.server_log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("logger") == "adselect.audit":
            msg = json.loads(rec["message"])
            if "error" not in msg:
                out.append(msg["request_id"])
    return out


def traffic(proc: ServiceProcess, acked: list[str], events: list[dict], stop: threading.Event) -> None:
    """One client, one request at a time: select, then a click on the first ad; stops at the first failure."""
    with httpx.Client(base_url=proc.base_url, headers={"X-API-Key": proc.api_key}, timeout=30) as c:
        while not stop.is_set():
            try:
                r = c.post("/v1/select", json={"user_id": f"u-{uuid.uuid4().hex}", "history": HISTORY, "k": 2, "use_llm": False})
                r.raise_for_status()
                d = r.json()
                acked.append(d["request_id"])
                ev = {"event_id": uuid.uuid4().hex, "request_id": d["request_id"], "ad_id": d["ads"][0]["ad_id"], "type": "click"}
                e = c.post("/v1/events", json=ev)
                e.raise_for_status()
                events.append(ev)
            except httpx.HTTPError:
                return


def test_sigkill_mid_traffic_loses_nothing_acknowledged(demo_settings, tmp_path):
    proc = ServiceProcess(demo_settings.data_dir, tmp_path / "svc", env={"ADSELECT_IMPRESSION_LOG_SYNC": "true"}).start()
    acked: list[str] = []
    events: list[dict] = []
    stop = threading.Event()
    client = threading.Thread(target=traffic, args=(proc, acked, events, stop))
    client.start()
    deadline = time.monotonic() + 60
    while len(events) < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL, mid-traffic
    client.join(30)
    stop.set()
    assert len(events) >= 25

    stats = LogReadStats()
    logged = [r["request_id"] for r in iter_log_records(proc.log_dir, stats=stats)]  # never raises on a torn tail
    audited = audit_ids(proc)
    assert stats.torn <= 1
    assert len(set(logged)) == len(logged) and len(set(audited)) == len(audited)
    assert set(acked) <= set(logged) <= set(audited)
    assert len(audited) - len(acked) <= 1  # at most the one request in flight when killed

    store = FeedbackStore(proc.feedback_path)
    try:
        for ev in events:
            (stored,) = [e for e in store.events_for(ev["request_id"]) if e.event_id == ev["event_id"]]
            assert (stored.ad_id, stored.type) == (ev["ad_id"], "click")
    finally:
        store.close()

    proc.start()  # restart on the crashed state
    try:
        with httpx.Client(base_url=proc.base_url, headers={"X-API-Key": proc.api_key}, timeout=30) as c:
            for ev in events[:5]:  # acknowledged before the kill: a retry is a duplicate, not a second click
                r = c.post("/v1/events", json=ev)
                assert (r.status_code, r.json()) == (200, {"status": "duplicate"})
            late = acked[-1]  # its served rows survived too: an event for it is accepted after the restart
            rec = next(r for r in iter_log_records(proc.log_dir) if r["request_id"] == late)
            r = c.post("/v1/events", json={"event_id": uuid.uuid4().hex, "request_id": late, "ad_id": rec["served"][-1], "type": "rendered"})
            assert r.status_code == 200, r.text
            d = c.post("/v1/select", json={"user_id": "after", "history": HISTORY, "k": 1, "use_llm": False}).json()
        proc.stop()
        after = [r["request_id"] for r in iter_log_records(proc.log_dir)]
        assert d["request_id"] in after and set(logged) <= set(after)
        assert set(after) <= set(audit_ids(proc))
    finally:
        proc.kill()


def test_sighup_reloads_the_experiment_of_a_running_service(demo_settings, tmp_path):
    import signal

    proc = ServiceProcess(demo_settings.data_dir, tmp_path / "svc").start()
    try:
        with httpx.Client(base_url=proc.base_url, headers={"X-API-Key": proc.api_key}, timeout=30) as c:
            body = {"user_id": "u-hup", "history": HISTORY, "k": 1, "use_llm": False}
            assert c.post("/v1/select", json=body).json()["arm"] == "default"
            proc.experiment_path.write_text(json.dumps({"name": "hup", "arms": [{"name": "after-hup", "share": 1.0}]}))
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while c.post("/v1/select", json=body).json()["arm"] != "after-hup":
                assert time.monotonic() < deadline, "SIGHUP did not reload the experiment"
                time.sleep(0.1)
            proc.experiment_path.write_text("{not json")
            proc.proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert proc.proc.poll() is None  # a bad file is refused; the service keeps running the previous version
            assert c.post("/v1/select", json=body).json()["arm"] == "after-hup"
    finally:
        proc.stop()
