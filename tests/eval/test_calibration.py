"""eval/calibration.py: the prior correction for negative sampling, the one quantile reliability/ECE, its noise
floor, isotonic vs Platt, and the isotonic block the serving fusion applies."""
from __future__ import annotations

import numpy as np
import pytest

from eval.calibration import (
    apply_calibration,
    choose_method,
    ece,
    ece_uncertainty,
    fit_calibration,
    negative_rate_for_base_rate,
    reliability,
    summary,
    user_share,
)
from selection.fusion import FusionModel


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _full_rows(n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < _sigmoid(1.2 * s - 4.0)).astype(float)  # base rate ≈ 4%
    return s, y


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_prior_correction_recovers_the_unsampled_base_rate(method: str) -> None:
    s, y = _full_rows()
    r = 0.05  # keep 5% of the negatives, every positive (as 1 click + 19 sampled negatives does)
    keep = (y == 1) | (np.random.default_rng(1).random(len(y)) < r)
    raw = fit_calibration(s[keep], y[keep], method=method)
    corrected = fit_calibration(s[keep], y[keep], method=method, negative_rate=r)
    ratio_raw = apply_calibration(raw, s).sum() / y.sum()
    ratio = apply_calibration(corrected, s).sum() / y.sum()
    assert ratio_raw > 3  # fitted on sampled rows, uncorrected: far too many clicks predicted on the full rows
    assert ratio == pytest.approx(1.0, abs=0.05)
    assert corrected["prior_correction"]["log_odds_offset"] == pytest.approx(np.log(r))
    # the same r from the base rates: odds(true) / odds(sampled)
    r2 = negative_rate_for_base_rate(float(y[keep].mean()), float(y.mean()))
    assert r2 == pytest.approx(r, rel=0.05)


def test_reliability_is_quantile_binned_and_ece_is_its_weighted_gap() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 1, 0, 1, 1, 1, 1], dtype=float)
    rel = reliability(p, y, bins=4)
    assert [b["n"] for b in rel] == [2, 2, 2, 2]  # equal counts, not equal widths
    assert [b["lo"] for b in rel] == [0.1, 0.3, 0.5, 0.7] and [b["hi"] for b in rel] == [0.2, 0.4, 0.6, 0.8]
    gaps = [abs(0.15 - 0), abs(0.35 - 0.5), abs(0.55 - 1), abs(0.75 - 1)]
    assert ece(p, y, bins=4) == pytest.approx(np.mean(gaps))
    out = summary(p, y, bins=4)
    assert out["ece"] == pytest.approx(np.mean(gaps)) and out["ece_bins"] == 4
    assert out["sum_p_over_sum_y"] == pytest.approx(p.sum() / y.sum())
    assert out["normalized_entropy"] == pytest.approx(out["logloss"] / out["logloss_base_rate"])


def test_ece_of_a_perfect_model_sits_at_its_noise_floor_and_a_miscalibrated_one_above() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.6, 5000)
    y = (rng.random(len(p)) < p).astype(float)
    good = ece_uncertainty(p, y, n_boot=100, n_null=100)
    assert ece(p, y) <= good["noise_floor_p95"] * 1.5
    assert good["noise_floor_mean"] == pytest.approx(good["noise_floor_formula"], rel=0.25)
    assert 0 < good["ece_ci"][0] < good["ece_ci"][1]
    bad = np.clip(p * 1.3, 0, 1)
    assert ece(bad, y) > 3 * good["noise_floor_p95"]


def test_isotonic_wins_where_platt_misfits_and_the_fusion_serves_its_knots() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, 20_000)
    y = (rng.random(len(s)) < np.where(s > 0.5, 0.7, 0.1)).astype(float)  # a step: no sigmoid of s fits it
    users = [f"u{i // 4}" for i in range(len(s))]
    method, losses = choose_method(s, y, users)
    assert method == "isotonic" and losses["isotonic"] < losses["platt"]
    iso = fit_calibration(s, y, method="isotonic")
    assert np.all(np.diff(iso["x"]) > 0) and np.all(np.diff(iso["p"]) >= 0)
    assert ece(apply_calibration(iso, s), y) < ece(apply_calibration(fit_calibration(s, y), s), y)
    fusion = FusionModel.from_json({**FusionModel.hand_tuned().to_json(), "calibration": {k: iso[k] for k in ("method", "x", "p")}})
    assert np.allclose(fusion.pctr(s[:100]), apply_calibration(iso, s[:100]))
    with pytest.raises(ValueError):
        FusionModel.from_json({**FusionModel.hand_tuned().to_json(), "calibration": {"method": "isotonic", "x": [1.0, 0.0], "p": [0.1, 0.2]}})


def test_user_share_is_a_deterministic_keyed_split() -> None:
    shares = [user_share(f"user-{i}") for i in range(2000)]
    assert shares == [user_share(f"user-{i}") for i in range(2000)]
    assert all(0 <= x < 1 for x in shares) and 0.45 < np.mean(np.array(shares) < 0.5) < 0.55


def test_cross_validation_folds_are_independent_of_the_user_split() -> None:
    """eval tune hands choose_method only users with user_share < CALIBRATION_SHARE; folds by the same hash
    put every row in one fold, no fold could be fitted and both methods came out inf (platt chosen blind)."""
    import numpy as np

    from eval.calibration import CALIBRATION_SHARE, choose_method, folds_of, user_share

    users = [u for u in (f"user-{i}" for i in range(4000)) if user_share(u) < CALIBRATION_SHARE]
    rows = [u for u in users for _ in range(5)]
    assert len(set(folds_of(rows, 5).tolist())) == 5
    rng = np.random.default_rng(0)
    s = rng.normal(size=len(rows))
    y = (rng.random(len(rows)) < 1 / (1 + np.exp(-s))).astype(float)
    _, losses = choose_method(s, y, rows)
    assert all(np.isfinite(v) for v in losses.values())
