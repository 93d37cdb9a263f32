"""The closed loop over HTTP: arm / propensity / personalized / versions in /v1/select, POST /v1/events
(idempotent, typed 4xx, authenticated), per-arm /metrics, POST /admin/reload (a bad file is refused and the
previous version keeps serving). Real demo services (Chroma, MiniLM, SQLite feedback, JSONL log) via TestClient."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval.features import FEATURES
from selection.fusion import FusionModel
from selection.impression_log import iter_log_records
from selection.services import build_services
from server.app import create_app

KEY = "k-test-0123456789"
AUTH = {"X-API-Key": KEY}
HISTORY = ["run-001", "run-004", "run-009"]


def weights(path: Path, feature: str) -> None:
    m = FusionModel.hand_tuned()
    m.coef = np.array([1.0 if f == feature else 0.0 for f in FEATURES])
    m.save(path)


@pytest.fixture()
def loop(demo_settings, demo_services, embedder, tmp_path):
    weights(tmp_path / "w.json", "dense")
    (tmp_path / "exp.yaml").write_text("name: e1\narms:\n  - {name: a, share: 1.0}\n")
    s = demo_settings.model_copy(update={
        "weights_path": tmp_path / "w.json", "experiment_path": tmp_path / "exp.yaml",
        "impression_log_dir": tmp_path / "impressions", "api_keys": [KEY], "llm_enabled": False,
    })  # fmt: skip
    svc = build_services(s, embedder=embedder, store=demo_services.store)
    with TestClient(create_app(s, services=svc)) as c:
        yield c, s, svc, tmp_path
    svc.close()


def select(c, **fields):
    r = c.post("/v1/select", headers=AUTH, json={"user_id": f"u-{uuid.uuid4().hex}", "history": HISTORY, "k": 2, "use_llm": False, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def event(c, rid, ad, *, eid=None, type="click", headers=AUTH, **extra):
    return c.post("/v1/events", headers=headers, json={"event_id": eid or uuid.uuid4().hex, "request_id": rid, "ad_id": ad, "type": type, **extra})


def metric(c, name: str, arm: str) -> float:
    text = c.get("/metrics", headers=AUTH).text
    line = next(l for l in text.splitlines() if l.startswith(f'{name}{{arm="{arm}"}}'))
    return float(line.split()[-1])


def test_select_names_the_arm_the_propensities_consent_and_versions(loop):
    c, s, svc, _ = loop
    r = select(c)
    assert r["arm"] == "a" and r["personalized"] is True
    assert all(ad["propensity"] == 1.0 for ad in r["ads"])
    assert r["versions"]["weights"] == svc.selector.versions["weights"] and r["versions"]["experiment"]
    anon = select(c, context={"consent": False})
    assert anon["personalized"] is False


def test_events_are_idempotent_typed_and_counted_per_arm(loop):
    c, *_ = loop
    r = select(c)
    rid, ad = r["request_id"], r["ads"][0]["ad_id"]
    before = metric(c, "adselect_arm_clicks_total", "a")
    first = event(c, rid, ad, eid="e-1")
    again = event(c, rid, ad, eid="e-1")
    assert (first.status_code, first.json()) == (200, {"status": "recorded"})
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    assert metric(c, "adselect_arm_clicks_total", "a") == before + 1
    assert metric(c, "adselect_arm_ctr", "a") > 0
    unknown = event(c, "no-such-request", ad)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request_id"
    other = next(a for a in ["run-002", "run-003", "run-005", "run-006"] if a not in {x["ad_id"] for x in r["ads"]})
    not_served = event(c, rid, other)
    assert not_served.status_code == 400 and not_served.json()["error"]["code"] == "ad_not_served"
    conflict = event(c, rid, ad, eid="e-1", type="rendered")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "event_id_conflict"
    assert event(c, rid, ad, headers={}).status_code == 401
    bad = event(c, rid, ad, type="purchase")
    assert bad.status_code == 422 and set(bad.json()) == {"error"}


def test_every_decision_is_one_log_record_with_the_response_fields(loop):
    c, s, svc, tmp = loop
    rs = [select(c) for _ in range(3)] + [select(c, context={"consent": False})]
    svc.impressions.flush()
    recs = {x["request_id"]: x for x in iter_log_records(tmp / "impressions")}
    assert set(recs) == {r["request_id"] for r in rs}
    for r in rs:
        x = recs[r["request_id"]]
        assert x["served"] == [a["ad_id"] for a in r["ads"]] and x["arm"] == r["arm"] and x["versions"] == r["versions"]
        assert x["history"] == (HISTORY if r["personalized"] else [])


def test_reload_swaps_weights_and_experiment_and_refuses_a_bad_file(loop):
    c, s, svc, tmp = loop
    old = select(c)["versions"]
    weights(tmp / "w.json", "popularity")
    (tmp / "exp.yaml").write_text("name: e2\narms:\n  - {name: b, share: 1.0}\n")
    assert c.post("/admin/reload").status_code == 401
    ok = c.post("/admin/reload", headers=AUTH)
    assert ok.status_code == 200, ok.text
    new = select(c)
    assert new["arm"] == "b" and new["versions"]["weights"] != old["weights"] and new["versions"] == ok.json()["versions"]
    (tmp / "w.json").write_text('{"features": ["not", "these"]')  # truncated JSON
    bad = c.post("/admin/reload", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "reload_refused"
    (tmp / "w.json").write_text(json.dumps(FusionModel.hand_tuned().to_json()))
    (tmp / "exp.yaml").write_text("name: e3\narms:\n  - {name: c, share: 0.5}\n")  # shares do not sum to 1
    assert c.post("/admin/reload", headers=AUTH).json()["error"]["code"] == "reload_refused"
    still = select(c)
    assert still["arm"] == "b" and still["versions"] == new["versions"]  # the previous version keeps serving
