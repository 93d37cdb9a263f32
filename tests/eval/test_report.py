"""eval/report.py: calibration (log loss, base rate, reliability) and the rewrite counts, on hand-made records."""
from __future__ import annotations

import math

import numpy as np
import pytest

from eval.config import BootstrapSpec
from eval.calibration import calibration
from eval.report import rewrite_summary
from eval.report_md import render_markdown

BOOT = BootstrapSpec(n_boot=200, seed=0)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(s, dtype=np.float64)))


def _records(scores: list[list[float]], clicked_at: list[list[int]], system: str = "default") -> dict[str, dict]:
    return {f"i{n}": {"scores": {system: s, "clicked_at": c}} for n, (s, c) in enumerate(zip(scores, clicked_at))}


def test_calibration_pools_every_candidate_and_matches_hand_computed_log_loss() -> None:
    scores = [[2.0, -1.0, -3.0], [0.0, -2.0], [1.0, -1.0, -1.5, -4.0]]
    clicked = [[0], [1], [0, 2]]
    c = calibration(_records(scores, clicked), ["i0", "i1", "i2", "missing"], system="default", pctr=_sigmoid, boot=BOOT)
    p = _sigmoid(np.concatenate([np.array(s) for s in scores]))
    y = np.array([1, 0, 0, 0, 1, 1, 0, 1, 0], dtype=float)
    assert c["impressions"] == 3 and c["rows"] == 9
    assert c["base_rate"] == pytest.approx(4 / 9)
    assert c["mean_predicted"] == pytest.approx(p.mean())
    assert c["logloss"] == pytest.approx(float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))))
    b = 4 / 9
    assert c["logloss_base_rate"] == pytest.approx(-(b * math.log(b) + (1 - b) * math.log(1 - b)))
    assert c["logloss_ci"][0] <= c["logloss"] <= c["logloss_ci"][1]
    assert sum(bin_["n"] for bin_ in c["reliability"]) == 9
    for bin_ in c["reliability"]:
        assert bin_["lo"] <= bin_["predicted"] <= bin_["hi"] and 0 <= bin_["observed"] <= 1
    assert 0 <= c["ece"] <= 1


def test_a_calibrated_model_beats_the_base_rate_and_a_miscalibrated_one_does_not() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(-3, 2, size=(2000, 10))
    y = rng.random(s.shape) < _sigmoid(s)
    recs = _records(s.tolist(), [np.flatnonzero(r).tolist() for r in y])
    order = list(recs)
    good = calibration(recs, order, system="default", pctr=_sigmoid, boot=BOOT)
    assert good["logloss"] < good["logloss_base_rate"] and good["ece"] < 0.02
    bad = calibration(recs, order, system="default", pctr=lambda x: _sigmoid(x - 4), boot=BOOT)
    assert bad["mean_predicted"] < good["base_rate"] / 5 and bad["ece"] > 0.05
    assert bad["logloss"] > good["logloss"]


def test_calibration_is_none_without_scores_and_ignores_other_systems() -> None:
    recs = _records([[1.0, 0.0]], [[0]], system="default+llm")
    assert calibration(recs, ["i0"], system="default", pctr=_sigmoid, boot=BOOT) is None
    assert calibration({"i0": {"metrics": {}}}, ["i0"], system="default", pctr=_sigmoid, boot=BOOT) is None
    assert calibration(recs, ["i0"], system="default+llm", pctr=_sigmoid, boot=BOOT)["rows"] == 2


def _rw(top_served: bool, copy_ok: bool, rejections: list[str], used: bool = True) -> dict:
    return {"llm_used": used, "rewrite": {"top_served": top_served, "copy_ok": copy_ok, "rejections": rejections}}


def test_rewrite_summary_counts_served_copy_and_violation_rates() -> None:
    llm = {
        "a": _rw(True, True, []),
        "b": _rw(False, True, ["justification_foreign_code"]),  # copy fine, on an ad below the top
        "c": _rw(False, False, ["url", "ungrounded_date", "url"]),  # refused by the validator
        "d": _rw(False, False, ["justification_foreign_code"]),  # copy dropped by the parser
        "e": _rw(False, False, [], used=False),  # degraded: nothing asked of the model came back
        "f": {"llm_used": True},  # rewrite off for this record: not counted
    }
    rw = rewrite_summary(llm, list(llm) + ["not-run"])
    assert rw["requested"] == 5 and rw["answered"] == 4
    assert rw["served"] == 1 and rw["share_served"] == pytest.approx(0.2)
    assert rw["copy_ok"] == 2
    assert rw["copy_discarded"] == 1  # d: answered, no copy served, no validator reason
    assert rw["violation_counts"] == {"justification_foreign_code": 2, "ungrounded_date": 1, "url": 1}
    assert rw["violations"]["url"] == pytest.approx(0.2) and rw["any_violation"] == pytest.approx(0.6)
    assert rewrite_summary({"f": {"llm_used": True}}, ["f"]) is None


def test_markdown_renders_calibration_and_rewrites() -> None:
    cal = calibration(_records([[2.0, -1.0], [0.5, -2.0]], [[0], [1]]), ["i0", "i1"], system="default", pctr=_sigmoid, boot=BOOT)
    report = {
        "metrics": {"default": {"auc": 0.5}},
        "ci": {"default": {"auc": [0.4, 0.6]}},
        "n": {"default": 2},
        "metric_names": ["auc"],
        "config": {"name": "t"},
        "provenance": {"git": {"commit": "x" * 40, "dirty": False}, "config_sha256": "0" * 64, "data": {}},
        "n_impressions": 2,
        "n_read": 2,
        "protocols": {"logged": 2},
        "skipped": {},
        "paired_vs_default": {},
        "calibration": {"default": cal},
        "rewrites": rewrite_summary({"a": _rw(True, True, ["justification_foreign_code"])}, ["a"]),
        "fusion": {"weights": {}, "separation": {"status": "unknown"}},
        "speed": {},
    }
    md = render_markdown(report)
    assert "## Calibration" in md and "log loss of the base rate" in md and "Reliability (bins of predicted pCTR)" in md
    assert "| default | 2 | 4 | 0.5000 |" in md
    assert "## Rewrites" in md and "| justification_foreign_code | 1 | 1.000 |" in md
