"""Fusion weights files: ones fitted before a feature existed load with weight 0 for it; unknown features are refused."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.features import FEATURES
from selection.fusion import SHIPPED_WEIGHTS, FusionModel


def _old_weights(rng: np.random.Generator) -> dict:
    old = [f for f in FEATURES if f != "sequence"]
    pairs = [[0, 1], [2, 9], [5, 5]]
    return {
        "features": old,
        "mean": rng.normal(size=len(old)).tolist(),
        "scale": rng.uniform(0.5, 2.0, size=len(old)).tolist(),
        "coef": rng.normal(size=len(old) + len(pairs)).tolist(),
        "intercept": -1.5,
        "interactions": pairs,
        "meta": {"source": "test"},
    }


def test_weights_without_the_sequence_feature_score_as_before_with_weight_zero_for_it():
    rng = np.random.default_rng(0)
    d = _old_weights(rng)
    X = rng.normal(size=(30, len(FEATURES))).astype(np.float32)
    X_old = X[:, [FEATURES.index(f) for f in d["features"]]]
    Z = (X_old - np.asarray(d["mean"])) / np.asarray(d["scale"])
    Z = np.hstack([Z, np.stack([Z[:, i] * Z[:, j] for i, j in d["interactions"]], axis=1)])
    want = Z @ np.asarray(d["coef"]) + d["intercept"]
    m = FusionModel.from_json(d)
    assert m.features == list(FEATURES) and m.meta["missing_features"] == ["sequence"]
    np.testing.assert_allclose(m.prior_scores(X), want, rtol=1e-9)
    X2 = X.copy()
    X2[:, FEATURES.index("sequence")] = rng.normal(size=30) * 100  # the missing feature cannot move a score
    np.testing.assert_allclose(m.prior_scores(X2), want, rtol=1e-9)


def test_a_feature_this_build_does_not_compute_is_refused():
    d = _old_weights(np.random.default_rng(1))
    d["features"] = [*d["features"][:-1], "not_a_feature"]
    with pytest.raises(ValueError):
        FusionModel.from_json(d)


def test_the_shipped_weights_carry_the_sequence_feature():
    m = FusionModel.load(None)
    assert m.meta["path"] == str(SHIPPED_WEIGHTS) and "missing_features" not in m.meta
    assert m.coef[FEATURES.index("sequence")] != 0.0


def test_sampled_pctr_undoes_the_prior_correction() -> None:
    """pctr is the catalog-scale probability (logit moved by log r); sampled_pctr is the scale of the rows
    it was fitted on, for judging it on a protocol that samples negatives the same way."""
    import numpy as np

    from selection.fusion import FusionModel

    m = FusionModel.hand_tuned()
    s = np.array([-2.0, 0.0, 3.0])
    m.calibration = {"method": "platt", "a": 1.5, "b": -7.0, "prior_correction": {"log_odds_offset": -6.5}}
    assert np.allclose(m.pctr(s), 1 / (1 + np.exp(-(1.5 * s - 7.0))))
    assert np.allclose(m.sampled_pctr(s), 1 / (1 + np.exp(-(1.5 * s - 0.5))))
    m.calibration = {"method": "platt", "a": 1.5, "b": -7.0}
    assert np.allclose(m.sampled_pctr(s), m.pctr(s))
