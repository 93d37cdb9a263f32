"""Refit the pCTR calibration on real feedback: the served ads of the impression log joined with clicks.

Rows are the served ads of records logged under the given weights (their `weights_version`; another
version's scores are on another scale), labelled clicked or not. Records are split by a hash of their
request id into a fitting part and a held-out part (`holdout` share); Platt scaling
(eval.calibration.fit_calibration) is fitted on the first and judged on the second: log loss, normalised
entropy (log loss / entropy of the base rate), Σp/Σy, and a quantile-binned reliability table with its
expected calibration error (count-weighted mean |predicted − observed| over equal-count bins).

The rows are the service's own impressions, not sampled negatives, so no negative-sampling correction
applies. (Fitting on sampled rows — e.g. 19 random negatives per click — would need the usual prior
correction b' = b + log(r) for a kept-negative rate r; not done here.) The refit weights keep the fusion
coefficients (the order never changes: Platt is monotone) and replace `calibration`; POST /admin/reload
serves them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval.calibration import entropy, fit_calibration, log_loss
from kernel.errors import UserError
from selection.fusion import FusionModel


def _holdout(request_id: str, share: float) -> bool:
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64 < share


def served_rows(records: Sequence[Mapping[str, Any]], *, weights_version: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(fused score, clicked, request id) per served ad of the records logged under `weights_version` (None: all)."""
    s, y, ids = [], [], []
    for r in records:
        if weights_version is not None and r.get("weights_version") != weights_version:
            continue
        clicked = set(r.get("clicked") or ())
        for a in r.get("served_ads") or ():
            if a.get("score") is None:
                continue
            s.append(float(a["score"]))
            y.append(1.0 if a["ad_id"] in clicked else 0.0)
            ids.append(str(r["request_id"]))
    return np.array(s), np.array(y), ids


def quantile_reliability(p: np.ndarray, y: np.ndarray, *, bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins of predicted pCTR: mean predicted, observed click rate, count."""
    order = np.argsort(p, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            out.append({"predicted": float(p[chunk].mean()), "observed": float(y[chunk].mean()), "n": int(len(chunk))})
    return out


def calibration_report(p: np.ndarray, y: np.ndarray, *, bins: int = 10) -> dict[str, Any]:
    base = float(y.mean())
    ll = float(log_loss(p, y).mean())
    rel = quantile_reliability(p, y, bins=bins)
    return {
        "rows": int(len(y)),
        "clicks": int(y.sum()),
        "base_rate": base,
        "logloss": ll,
        "normalized_entropy": ll / entropy(base) if entropy(base) > 0 else None,
        "sum_p_over_sum_y": float(p.sum() / y.sum()) if y.sum() > 0 else None,
        "ece": float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in rel) / len(y)),
        "reliability": rel,
    }


def refit_calibration(
    records: Sequence[Mapping[str, Any]], fusion: FusionModel, *, weights_version: str | None, holdout: float = 0.3, bins: int = 10
) -> tuple[FusionModel, dict[str, Any]]:
    """The weights with a calibration refit on the log's feedback, and the report (before/after on held-out rows)."""
    scores, y, ids = served_rows(records, weights_version=weights_version)
    if len(y) == 0:
        raise UserError("no served ads logged under these weights (check --weights against the log's weights_version)")
    test = np.array([_holdout(i, holdout) for i in ids])
    if test.all() or not test.any() or y[~test].sum() == 0 or y[~test].sum() == (~test).sum():
        raise UserError("too few rows (or no clicks / only clicks) to fit and hold out a calibration")
    cal = fit_calibration(scores[~test], y[~test])
    refit = FusionModel.from_json({**fusion.to_json(), "calibration": {k: cal[k] for k in ("method", "a", "b")}})
    refit.meta = {**fusion.meta, "calibration_source": "impression log feedback", "calibration_rows": int((~test).sum())}
    report = {
        "weights_version": weights_version,
        "fit_rows": int((~test).sum()),
        "holdout_share": holdout,
        "calibration": {"method": "platt", "a": cal["a"], "b": cal["b"]},
        "holdout_before": calibration_report(fusion.pctr(scores[test]), y[test], bins=bins),
        "holdout_after": calibration_report(refit.pctr(scores[test]), y[test], bins=bins),
    }
    return refit, report
