"""Calibration in one place: the Platt fit of pCTR, log loss, reliability bins, and the report's block.

- `fit_calibration(scores, y)`: pCTR = sigmoid(a·score + b) on logged clicks (eval tune writes it into
  the weights; `FusionModel.pctr` applies it at serving time).
- `log_loss(p, y)`: per-row binary log loss with p clipped to [EPS, 1 - EPS] (the only log loss of eval/).
- `reliability(p, y)`: equal-width bins of predicted pCTR with mean predicted, observed rate and count.
- `calibration(records, order, …)`: report.json's `calibration[system]` over logged impressions: rows
  pooled over every candidate, the log-loss interval from resampled impressions (eval.bootstrap).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from eval.bootstrap import percentile_interval, resamples
from eval.config import BootstrapSpec

EPS = 1e-12  # log loss clips pCTR to [EPS, 1 - EPS]


def log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row binary log loss."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def entropy(base: float) -> float:
    """Log loss of predicting `base` for rows whose click rate is `base` (the no-skill reference)."""
    if base <= 0.0 or base >= 1.0:
        return 0.0
    return -(base * math.log(base) + (1 - base) * math.log(1 - base))


def fit_calibration(scores: np.ndarray, y: np.ndarray) -> dict:
    """Platt scaling pCTR = sigmoid(a·score + b) on logged clicks (strictly monotone: never reorders)."""
    from sklearn.linear_model import LogisticRegression

    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(scores, y)
    a, b = float(lr.coef_.ravel()[0]), float(lr.intercept_[0])
    if a <= 0:  # scores that do not rank clicks up cannot be calibrated monotonically: fall back to the base rate
        a, b = 1e-6, float(np.log(max(y.mean(), 1e-6) / max(1 - y.mean(), 1e-6)))
    p = 1 / (1 + np.exp(-(a * scores.ravel() + b)))
    return {"method": "platt", "a": a, "b": b, "rows": int(len(y)), "logloss": float(log_loss(p, y).mean()), "base_rate": float(y.mean())}


def reliability(p: np.ndarray, y: np.ndarray, *, bins: int = 10) -> list[dict]:
    """Per equal-width bin of predicted pCTR: mean predicted, observed click rate, count."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "predicted": float(p[m].mean()), "observed": float(y[m].mean()), "n": int(m.sum())})
    return out


def calibration(
    records: dict[str, dict],
    order: list[str],
    *,
    system: str,
    pctr: Callable[[np.ndarray], np.ndarray],
    boot: BootstrapSpec,
    bins: int = 10,
) -> dict[str, Any] | None:
    """Calibration of `system`'s pCTR over the impressions of `order`: `pctr` (FusionModel.pctr) of the
    fused scores kept in `records[id]["scores"][system]`, labelled by `records[id]["scores"]["clicked_at"]`.

    Rows are pooled (every candidate of every impression); the log-loss interval resamples impressions.
    `logloss_base_rate` is the log loss of predicting the observed base rate for every row (the
    no-skill reference); `ece` is the count-weighted mean |predicted − observed| over the bins."""
    ss, ys = [], []
    for iid in order:
        rec = records.get(iid)
        c = rec.get("scores") if rec is not None else None
        if c and c.get(system):
            y = [0.0] * len(c[system])
            for k in c["clicked_at"]:
                y[k] = 1.0
            ss.append(c[system])
            ys.append(y)
    if not ss:
        return None
    sizes = np.array([len(x) for x in ss])
    p = pctr(np.fromiter((v for x in ss for v in x), dtype=np.float64, count=int(sizes.sum())))
    y = np.fromiter((v for x in ys for v in x), dtype=np.float64, count=int(sizes.sum()))
    loss = log_loss(p, y)
    base = float(y.mean())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    per_imp = np.add.reduceat(loss, starts)
    rng = np.random.default_rng(boot.seed)
    boots = np.concatenate(
        [per_imp[idx].sum(axis=1) / sizes[idx].sum(axis=1) for idx in resamples(len(sizes), n_boot=boot.n_boot, rng=rng)]
    )
    rel = reliability(p, y, bins=bins)
    return {
        "impressions": len(sizes),
        "rows": int(len(y)),
        "base_rate": base,
        "mean_predicted": float(p.mean()),
        "logloss": float(loss.mean()),
        "logloss_ci": list(percentile_interval(boots, boot.level)),
        "logloss_base_rate": entropy(base),
        "ece": float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in rel) / len(y)),
        "reliability": rel,
    }
