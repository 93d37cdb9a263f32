"""The served pCTR under a list-aware calibration (platt_list) is the refit's formula over the logged list:
the endpoint's pipeline, its impression log and eval.log_calibration compute one number."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import numpy as np
import pytest

from eval.calibration import apply_calibration
from eval.log_calibration import served_rows
from kernel.types import SelectRequest
from selection.experiments import Arm, Experiment, Variant
from selection.fusion import FusionModel, calibrated_pctr
from selection.impression_log import JsonlImpressionLog, iter_log_records
from selection.services import arm_policies, weights_version

PLATT_LIST = {"method": "platt_list", "a": 0.3, "b": -1.0, "w": {"log_share": 0.8, "share": 1.5, "margin": 0.2}}


def test_the_hot_path_serves_and_logs_the_refits_list_aware_pctr(demo_services, tmp_path):
    weights = tmp_path / "list.json"
    FusionModel.from_json({**demo_services.fusion.to_json(), "calibration": PLATT_LIST}).save(weights)
    exp = Experiment(name="t", arms=[Arm(name="list", share=1.0, variant=Variant(weights=str(weights), llm=False))])
    log = JsonlImpressionLog(tmp_path / "impressions", fsync="never")
    sel = replace(demo_services.selector, experiment=exp, impressions=log, caps=None)
    sel.arm_policies = arm_policies(sel, exp, settings=demo_services.settings, llm_url=None, reranker_injected=True)
    decisions = []
    for history in (["run-001", "run-004", "run-009"], ["run-002"], ["run-003", "run-007"]):
        req = SelectRequest(user_id=f"u-{uuid.uuid4().hex}", history=history, k=2, use_llm=False)
        decisions.append(asyncio.run(sel.aselect(req)))
    log.flush()
    records = {r["request_id"]: r for r in iter_log_records(tmp_path / "impressions")}
    version = weights_version(FusionModel.load(weights))
    for d in decisions:
        r = records[d.request_id]
        assert r["weights_version"] == version
        scores = np.array([c["score"] for c in r["scored"]])
        ids = [c["ad_id"] for c in r["scored"]]
        expected = calibrated_pctr(PLATT_LIST, scores)  # the formula over the logged list (scores logged to 6 decimals)
        np.testing.assert_allclose([c["pctr"] for c in r["scored"]], expected, atol=2e-6)
        for a, logged in zip(d.ads, r["served_ads"]):
            assert a.pctr == logged["pctr"] == pytest.approx(float(expected[ids.index(a.ad.ad_id)]), abs=2e-6)
            assert a.pctr != round(float(calibrated_pctr(PLATT_LIST, np.array([a.score]))[0]), 6)  # the list matters
    rows = served_rows(list(records.values()), weights_version=version)
    logged = [a["pctr"] for d in decisions for a in records[d.request_id]["served_ads"]]
    np.testing.assert_allclose(apply_calibration(PLATT_LIST, rows.scores, context=rows.context), logged, atol=2e-6)
