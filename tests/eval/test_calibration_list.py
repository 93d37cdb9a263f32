"""The list-aware pCTR (`platt_list`): its fit/apply round trip through the weights JSON, a log where a
score-only calibration is miscalibrated by construction (a click depends on the other candidates) and the
list-aware one is not, and old calibration blocks that keep their formula."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.calibration import apply_calibration, ece, fit_calibration
from eval.log_calibration import refit_calibration, served_rows
from selection.fusion import FusionModel

N_LISTS = 4000
N_CANDS = 10


def conditional_logit_log(n: int = N_LISTS, seed: int = 0) -> list[dict]:
    """Impression records where each list holds exactly one ad the user clicks if served, drawn with the
    conditional-logit share of the fused scores (P(ad i) = exp(s_i) / Σ_j exp(s_j)); each list's scores are
    shifted by a level of its own (the share does not move, the score does); half the lists serve their
    best-scored ad (arm "top"), half a uniformly drawn one (arm "explore")."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        s = rng.normal(0.0, 1.2, N_CANDS) + rng.normal(0.0, 1.5)
        share = np.exp(s - s.max())
        positive = int(rng.choice(N_CANDS, p=share / share.sum()))
        arm = "top" if i % 2 == 0 else "explore"
        served = int(np.argmax(s)) if arm == "top" else int(rng.integers(N_CANDS))
        ids = [f"ad{i}-{j}" for j in range(N_CANDS)]
        recs.append({
            "request_id": f"r{i}", "user_id": f"u{i}", "arm": arm, "weights_version": "w1",
            "scored": [{"ad_id": a, "score": float(v)} for a, v in zip(ids, s)],
            "served_ads": [{"ad_id": ids[served], "position": 0, "score": float(s[served])}],
            "clicked": [ids[served]] if served == positive else [],
        })  # fmt: skip
    return recs


def served_pctr(model: FusionModel, recs: list[dict]) -> np.ndarray:
    """Each served ad's pCTR as the hot path computes it: `pctr` over the record's scored list, one call per list."""
    out = []
    for r in recs:
        ids = [c["ad_id"] for c in r["scored"]]
        p = model.pctr(np.array([c["score"] for c in r["scored"]]))
        out.extend(float(p[ids.index(a["ad_id"])]) for a in r["served_ads"])
    return np.array(out)


def test_score_only_calibration_is_miscalibrated_per_arm_and_the_list_aware_refit_is_not() -> None:
    recs = conditional_logit_log()
    y = np.array([1.0 if r["clicked"] else 0.0 for r in recs])
    arm = np.array([r["arm"] for r in recs])
    base = FusionModel.hand_tuned()
    for method in ("platt", "isotonic"):  # at one score, the list's best clicks more often than an explored ad
        score_only, _ = refit_calibration(recs, base, weights_version="w1", method=method)
        p = served_pctr(score_only, recs)
        assert max(ece(p[arm == a], y[arm == a]) for a in ("top", "explore")) > 0.06
    refit, rep = refit_calibration(recs, base, weights_version="w1")  # auto: chosen by cross-validated log loss
    assert rep["method"] == "platt_list" and rep["cv_logloss"]["platt_list"] < min(rep["cv_logloss"]["platt"], rep["cv_logloss"]["isotonic"])
    p = served_pctr(refit, recs)
    for a in ("top", "explore"):
        assert ece(p[arm == a], y[arm == a]) < 0.04 and abs(p[arm == a].sum() / y[arm == a].sum() - 1) < 0.1
    after = rep["holdout_after"]
    assert after["ece"] < 2 * after["noise_floor_p95"] and after["ece"] < rep["holdout_before"]["ece"]
    assert rep["monotone_in_list"] is True


def test_platt_list_round_trips_through_the_weights_json_and_the_refit_reads_its_context(tmp_path) -> None:
    recs = conditional_logit_log(n=600, seed=1)
    rows = served_rows(recs, weights_version="w1")
    cal = fit_calibration(rows.scores, rows.y, method="platt_list", context=rows.context)
    assert set(cal["w"]) == {"log_share", "share", "margin"}
    model = FusionModel.hand_tuned()
    model.calibration = {k: cal[k] for k in ("method", "a", "b", "w")}
    model.save(tmp_path / "w.json")
    loaded = FusionModel.load(tmp_path / "w.json")
    assert loaded.calibration == model.calibration
    # the refit's rows carry each served ad's place in its logged list: the hot path's pCTR over that list
    np.testing.assert_allclose(apply_calibration(cal, rows.scores, context=rows.context), served_pctr(loaded, recs), rtol=1e-12)
    # one list: the default of pctr is the whole array as one list
    s = np.array([c["score"] for c in recs[0]["scored"]])
    np.testing.assert_allclose(loaded.pctr(s), loaded.pctr(s, groups=np.zeros(len(s))), rtol=1e-12)
    np.testing.assert_allclose(loaded.pctr(np.r_[s, s], groups=np.r_[np.zeros(len(s)), np.ones(len(s))]), np.r_[loaded.pctr(s), loaded.pctr(s)])
    # the prior correction moves b by log(r), as Platt's
    corrected = fit_calibration(rows.scores, rows.y, method="platt_list", context=rows.context, negative_rate=0.1)
    assert corrected["b"] == pytest.approx(cal["b"] + np.log(0.1)) and corrected["w"] == cal["w"]


@pytest.mark.parametrize(
    "block",
    [
        {"method": "platt_list", "a": 1.0, "b": 0.0},  # no weights
        {"method": "platt_list", "a": 1.0, "b": 0.0, "w": {"rank": 1.0}},  # a term this build does not compute
        {"method": "platt_list", "a": 1.0, "b": 0.0, "w": {"share": float("nan")}},
        {"method": "platt_list", "a": "x", "b": 0.0, "w": {"share": 1.0}},
    ],
)
def test_a_bad_platt_list_block_is_refused(block: dict) -> None:
    d = FusionModel.hand_tuned().to_json()
    with pytest.raises(ValueError):
        FusionModel.from_json({**d, "calibration": block})


def test_old_calibration_blocks_keep_their_formula_whatever_the_list() -> None:
    from selection.fusion import list_context

    s = np.array([-1.0, 0.5, 2.0])
    d = json.loads(json.dumps(FusionModel.hand_tuned().to_json()))
    platt = FusionModel.from_json({**d, "calibration": {"method": "platt", "a": 0.7, "b": -0.2}})
    np.testing.assert_allclose(platt.pctr(s), 1 / (1 + np.exp(-(0.7 * s - 0.2))))
    np.testing.assert_allclose(platt.pctr(s[:1]), platt.pctr(s)[:1])  # score-only: the other candidates do not matter
    iso = FusionModel.from_json({**d, "calibration": {"method": "isotonic", "x": [-1.0, 2.0], "p": [0.1, 0.4]}})
    np.testing.assert_allclose(iso.pctr(s), [0.1, 0.25, 0.4])
    ctx = list_context(s)
    np.testing.assert_allclose(ctx["share"].sum(), 1.0) and np.testing.assert_allclose(ctx["margin"], s - 2.0)
