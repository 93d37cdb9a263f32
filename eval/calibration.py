"""Calibration in one place: fitting pCTR, log loss, the reliability table and ECE, and the report's block.

- `fit_calibration(scores, y, method=…, negative_rate=…)`: pCTR from the fused score, `platt`
  (sigmoid(a·score + b)) or `isotonic` (centred isotonic regression: the pool-adjacent-violators fit with
  each constant block collapsed to its centre and interpolated linearly, so it is strictly increasing over
  the fitted range and never reorders there). With `negative_rate` r (the share of negatives kept when
  the rows were negatively sampled) the fit is prior-corrected (King & Zeng 2001): the log-odds move by
  log(r) — Platt's b' = b + log(r), isotonic's knots p' = r·p / (r·p + 1 − p) — so the pCTR refers to
  the unsampled rows. `selection.fusion.calibrated_pctr` (FusionModel.pctr) is the formula serving applies.
  `platt_list` is list-aware: sigmoid(a·score + b + Σ w[t]·t) over the ad's place among the scored
  candidates (selection.fusion.list_context: log_share = s − logsumexp of the list's scores, its
  conditional-logit share; share = exp(log_share); margin = s − the list's best score), a logistic
  regression on the rows with their list `context`. Whether an ad is clicked depends on the other
  candidates (a user clicks one of them), so at one score the list's best and an explored or
  another arm's pick click at different rates: a score-only pCTR cannot be calibrated for both. The prior
  correction moves its b by log(r) as Platt's.
- `choose_method(...)`: the method of METHODS (platt_list only when the rows' list context is given) with
  the lowest cross-validated log loss over folds of users.
- `log_loss`, `entropy`: per-row log loss (p clipped to [EPS, 1 − EPS]) and the no-skill reference.
- `reliability(p, y, bins=ECE_BINS)`: THE reliability table of eval/: equal-count (quantile) bins of
  predicted pCTR with their range, mean predicted, observed rate and count; `ece` is the count-weighted
  mean |predicted − observed| over those bins. `summary` is the block every report shows (log loss,
  normalised entropy, Σp/Σy, ECE, the table); `ece_uncertainty` its bootstrap interval and noise floor
  (also per cluster of rows that share one outcome, when given).
- `calibration(records, order, …)`: report.json's `calibration[system]` over logged impressions.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from eval.bootstrap import percentile_interval, resamples
from eval.config import BootstrapSpec
from kernel.hashing import user_key
from selection.fusion import LIST_TERMS, calibrated_pctr

EPS = 1e-12  # log loss clips pCTR to [EPS, 1 - EPS]
ECE_BINS = 10  # equal-count bins of the reliability table and ECE, unless a report states another count
ISOTONIC_CLIP = 1e-4  # isotonic knots are kept in [ISOTONIC_CLIP, 1 - ISOTONIC_CLIP] (a finite log loss on new rows)
METHODS = ("platt", "isotonic", "platt_list")
Context = dict[str, np.ndarray]  # selection.fusion.list_context of each row (its own list), row-aligned with the scores
CALIBRATION_SHARE = 0.2  # share of eval tune's users (by keyed hash) kept apart for the pCTR calibration
HOLDOUT_SHARE = 0.5  # share of users (by keyed hash) a calibration refit holds out to judge itself
SPLIT_KEY = b"adselect-calibration-user-split"  # the HMAC key of the user split (a fixed key: the split is reproducible)
FOLD_KEY = b"adselect-calibration-user-folds"  # the HMAC key of the cross-fitting folds (independent of the split)


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


def user_share(user: str) -> float:
    """A user's place in [0, 1) by keyed hash (HMAC-SHA256 under SPLIT_KEY): splits and folds by user."""
    return int(user_key(user, secret=SPLIT_KEY)[:13], 16) / 16**13


# ---- fitting --------------------------------------------------------------------------------------


def _odds_shift(p: np.ndarray, r: float) -> np.ndarray:
    """p with its odds multiplied by r (the prior correction of a probability)."""
    return r * p / (r * p + 1 - p)


def _fit_platt(scores: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e6, max_iter=1000).fit(scores.reshape(-1, 1), y)
    a, b = float(lr.coef_.ravel()[0]), float(lr.intercept_[0])
    if a <= 0:  # scores that do not rank clicks up cannot be calibrated monotonically: fall back to the base rate
        a, b = 1e-6, float(np.log(max(y.mean(), 1e-6) / max(1 - y.mean(), 1e-6)))
    return {"method": "platt", "a": a, "b": b}


def _fit_isotonic(scores: np.ndarray, y: np.ndarray) -> dict:
    """Centred isotonic regression (Oron & Flournoy 2017): PAV blocks -> one knot at each block's centre."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(scores, y)
    xs, ps = np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_)
    knots_x, knots_p = [], []
    start = 0
    for i in range(1, len(ps) + 1):
        if i == len(ps) or ps[i] != ps[start]:
            knots_x.append(float(xs[start:i].mean()))
            knots_p.append(float(ps[start]))
            start = i
    if len(knots_x) < 2:  # one block: no ranking signal; a flat line over the fitted range
        lo, hi = float(scores.min()), float(scores.max())
        knots_x, knots_p = [lo, hi if hi > lo else lo + 1.0], [float(y.mean())] * 2
    p = np.clip(np.array(knots_p), ISOTONIC_CLIP, 1 - ISOTONIC_CLIP)
    return {"method": "isotonic", "x": knots_x, "p": p.tolist()}


def _fit_platt_list(scores: np.ndarray, y: np.ndarray, context: Context) -> dict:
    from sklearn.linear_model import LogisticRegression

    X = np.column_stack([scores, *(np.asarray(context[t], dtype=np.float64) for t in LIST_TERMS)])
    lr = LogisticRegression(C=1e6, max_iter=5000).fit(X, y)
    coef = lr.coef_.ravel()
    return {"method": "platt_list", "a": float(coef[0]), "b": float(lr.intercept_[0]), "w": {t: float(c) for t, c in zip(LIST_TERMS, coef[1:])}}


def apply_calibration(cal: dict, scores: np.ndarray, *, context: Context | None = None) -> np.ndarray:
    """pCTR of `scores` under a calibration block: selection.fusion.calibrated_pctr, the serving formula
    (`context`: each row's list terms; None: `scores` are one list)."""
    return calibrated_pctr(cal, scores, context=context)


def _rows(context: Context | None, mask: np.ndarray) -> Context | None:
    return None if context is None else {k: np.asarray(v)[mask] for k, v in context.items()}


def fit_calibration(
    scores: np.ndarray, y: np.ndarray, *, method: str = "platt", negative_rate: float | None = None, context: Context | None = None
) -> dict:
    """Fit pCTR = f(score) on labelled rows (see the module docstring); the block FusionModel.calibration holds.

    `negative_rate` r in (0, 1]: the rows keep each negative with probability r (1 positive + 19 sampled
    negatives of a pool of N: r = 19/N); the fit is then corrected by log(r) in log-odds. `context` (each
    row's selection.fusion.list_context within its own list) is needed by platt_list."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r} ({', '.join(METHODS)})")
    if method == "platt_list":
        if context is None:
            raise ValueError("platt_list needs each row's list context (selection.fusion.list_context)")
        cal = _fit_platt_list(scores, y, context)
    else:
        cal = _fit_platt(scores, y) if method == "platt" else _fit_isotonic(scores, y)
    p = apply_calibration(cal, scores, context=context)
    cal.update(rows=int(len(y)), logloss=float(log_loss(p, y).mean()), base_rate=float(y.mean()))
    if negative_rate is not None and negative_rate != 1.0:
        if not 0.0 < negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
        if method in ("platt", "platt_list"):
            cal["b"] += math.log(negative_rate)
        else:
            cal["p"] = _odds_shift(np.array(cal["p"]), negative_rate).tolist()
        cal["prior_correction"] = {
            "negative_rate": float(negative_rate),
            "log_odds_offset": math.log(negative_rate),
            "formula": "King & Zeng prior correction: logit p' = logit p + log(r), r = share of negatives kept",
            "sampled_base_rate": float(y.mean()),
        }
    return cal


def negative_rate_for_base_rate(sampled_base_rate: float, true_base_rate: float) -> float:
    """The kept-negative share r that turns `sampled_base_rate` into `true_base_rate`: odds(true)/odds(sampled)."""
    if not (0 < sampled_base_rate < 1 and 0 < true_base_rate < 1):
        raise ValueError("base rates must be in (0, 1)")
    return (true_base_rate / (1 - true_base_rate)) / (sampled_base_rate / (1 - sampled_base_rate))


def folds_of(users: Sequence[str], folds: int) -> np.ndarray:
    """Fold number (0..folds-1) of each row by its user's keyed hash under FOLD_KEY: a key of its own, since
    the rows are often one side of a user_share split already (eval tune's calibration users all have
    user_share < CALIBRATION_SHARE, so folds by user_share would put them all in fold 0)."""
    return np.array([int(int(user_key(u, secret=FOLD_KEY)[:13], 16) / 16**13 * folds) for u in users])


def cross_fitted(
    scores: np.ndarray, y: np.ndarray, users: Sequence[str], *, method: str, folds: int = 5, context: Context | None = None
) -> np.ndarray:
    """Out-of-fold pCTR: each row predicted by a fit on the other folds' users (never its own user)."""
    f = folds_of(users, folds)
    out = np.full(len(y), np.nan)
    for k in range(folds):
        test = f == k
        if test.any() and (~test).any() and 0 < y[~test].sum() < (~test).sum():
            cal = fit_calibration(scores[~test], y[~test], method=method, context=_rows(context, ~test))
            out[test] = apply_calibration(cal, scores[test], context=_rows(context, test))
    return out


def choose_method(
    scores: np.ndarray, y: np.ndarray, users: Sequence[str], *, folds: int = 5, context: Context | None = None
) -> tuple[str, dict[str, float]]:
    """The method of METHODS with the lowest cross-validated log loss (folds of users), and every method's
    loss; platt_list is a candidate only with the rows' list `context`."""
    losses = {}
    for m in METHODS:
        if m == "platt_list" and context is None:
            continue
        p = cross_fitted(scores, y, users, method=m, folds=folds, context=context)
        ok = ~np.isnan(p)
        losses[m] = float(log_loss(p[ok], y[ok]).mean()) if ok.any() else float("inf")
    return min(losses, key=lambda m: losses[m]), losses


# ---- judging --------------------------------------------------------------------------------------


def reliability(p: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-count bins of predicted pCTR (sorted, split into `bins` parts of ±1 row): the bin's predicted
    range lo..hi, mean predicted, observed click rate, count."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            pc = p[chunk]
            out.append({"lo": float(pc.min()), "hi": float(pc.max()), "predicted": float(pc.mean()), "observed": float(y[chunk].mean()), "n": int(len(chunk))})
    return out


def ece(p: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error: count-weighted mean |predicted − observed| over `reliability`'s bins."""
    rel = reliability(p, y, bins=bins)
    n = sum(b["n"] for b in rel)
    return float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in rel) / n) if n else float("nan")


def summary(p: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> dict[str, Any]:
    """The calibration block every report shows: log loss, normalised entropy, Σp/Σy, ECE, the table."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    base = float(y.mean())
    ll = float(log_loss(p, y).mean())
    rel = reliability(p, y, bins=bins)
    return {
        "rows": int(len(y)),
        "clicks": int(y.sum()),
        "base_rate": base,
        "mean_predicted": float(p.mean()),
        "logloss": ll,
        "logloss_base_rate": entropy(base),
        "normalized_entropy": ll / entropy(base) if entropy(base) > 0 else None,
        "sum_p_over_sum_y": float(p.sum() / y.sum()) if y.sum() > 0 else None,
        "ece": float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in rel) / len(y)),
        "ece_bins": bins,
        "ece_binning": "quantile (equal-count)",
        "reliability": rel,
    }


def ece_uncertainty(
    p: np.ndarray,
    y: np.ndarray,
    *,
    bins: int = ECE_BINS,
    n_boot: int = 200,
    n_null: int = 200,
    seed: int = 0,
    level: float = 0.95,
    clusters: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How far the measured ECE is from noise: a bootstrap interval (rows resampled, bins re-cut) and the
    noise floor — the ECE a perfectly calibrated model would show on these rows, y* ~ Bernoulli(p)
    (Monte Carlo mean and 95th percentile; ≈ 0.8·sqrt(bins·mean p(1 − p) / n)).

    `clusters` (a key per row, e.g. user + ad): rows of one key share one outcome (a simulated user who
    is shown the same ad again clicks again), so they are not independent; the `*_clusters` figures then
    draw one y* per cluster (the floor of that many independent outcomes) and resample clusters."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.array([ece(p[idx], y[idx], bins=bins) for chunk in resamples(len(y), n_boot=n_boot, rng=rng) for idx in chunk])
    null = np.array([ece(p, (rng.random(len(p)) < p).astype(np.float64), bins=bins) for _ in range(n_null)])
    out = _clustered(p, y, clusters, bins=bins, n_boot=n_boot, n_null=n_null, rng=rng, level=level) if clusters is not None else {}
    return {**out, 
        "ece_ci": list(percentile_interval(boots, level)),
        "ece_bootstrap": {"n": n_boot, "resampled": "rows", "level": level, "seed": seed},
        "noise_floor_mean": float(null.mean()),
        "noise_floor_p95": float(np.percentile(null, 95)),
        "noise_floor_formula": float(math.sqrt(2 / math.pi) * math.sqrt(bins * float(np.mean(p * (1 - p))) / len(p))),
    }


def _clustered(
    p: np.ndarray, y: np.ndarray, clusters: Sequence[str], *, bins: int, n_boot: int, n_null: int, rng: np.random.Generator, level: float
) -> dict[str, Any]:
    _, code = np.unique(np.asarray(list(clusters)), return_inverse=True)
    n = int(code.max()) + 1 if len(code) else 0
    by = np.argsort(code, kind="stable")
    size = np.bincount(code, minlength=n)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    boots = []
    for _ in range(n_boot):
        g = rng.integers(0, n, size=n)
        idx = by[np.repeat(start[g], size[g]) + (np.arange(size[g].sum()) - np.repeat(np.cumsum(size[g]) - size[g], size[g]))]
        boots.append(ece(p[idx], y[idx], bins=bins))
    null = np.array([ece(p, (rng.random(n)[code] < p).astype(np.float64), bins=bins) for _ in range(n_null)])
    return {"clusters": n, "ece_ci_clusters": list(percentile_interval(boots, level)),
            "noise_floor_clusters_mean": float(null.mean()), "noise_floor_clusters_p95": float(np.percentile(null, 95))}  # fmt: skip


def calibration_line(c: dict[str, Any]) -> str:
    """One line of a calibration block (summary, + ece_uncertainty when present) for a terminal."""
    ne = c.get("normalized_entropy")
    spy = c.get("sum_p_over_sum_y")
    line = (f"rows {c['rows']} logloss {c['logloss']:.4f} NE {ne:.3f} sum_p/sum_y {spy:.3f} ECE {c['ece']:.4f}"
            if ne is not None and spy is not None else f"rows {c['rows']} logloss {c['logloss']:.4f} ECE {c['ece']:.4f}")  # fmt: skip
    if "ece_ci" in c:
        lo, hi = c["ece_ci"]
        line += f" [{lo:.4f}, {hi:.4f}] (noise floor {c['noise_floor_mean']:.4f}, p95 {c['noise_floor_p95']:.4f})"
    if "clusters" in c:
        lo, hi = c["ece_ci_clusters"]
        line += f"; {c['clusters']} clusters: [{lo:.4f}, {hi:.4f}] (noise floor {c['noise_floor_clusters_mean']:.4f}, p95 {c['noise_floor_clusters_p95']:.4f})"
    return line + f", {c.get('ece_bins', ECE_BINS)} quantile bins"


def calibration(
    records: dict[str, dict],
    order: list[str],
    *,
    system: str,
    pctr: Callable[[np.ndarray], np.ndarray],
    boot: BootstrapSpec,
    bins: int = ECE_BINS,
) -> dict[str, Any] | None:
    """Calibration of `system`'s pCTR over the impressions of `order`: `pctr` (FusionModel.pctr, called once per
    impression: its scores are one list, so a list-aware pCTR sees that impression's candidates) of the
    fused scores kept in `records[id]["scores"][system]`, labelled by `records[id]["scores"]["clicked_at"]`.

    Rows are pooled (every candidate of every impression); the log-loss interval resamples impressions.
    `logloss_base_rate` is the log loss of predicting the observed base rate for every row (the
    no-skill reference); `ece` is `summary`'s (quantile bins, `bins` of them)."""
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
    p = np.concatenate([np.asarray(pctr(np.asarray(x, dtype=np.float64)), dtype=np.float64) for x in ss])  # one list per call
    y = np.fromiter((v for x in ys for v in x), dtype=np.float64, count=int(sizes.sum()))
    loss = log_loss(p, y)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    per_imp = np.add.reduceat(loss, starts)
    rng = np.random.default_rng(boot.seed)
    boots = np.concatenate(
        [per_imp[idx].sum(axis=1) / sizes[idx].sum(axis=1) for idx in resamples(len(sizes), n_boot=boot.n_boot, rng=rng)]
    )
    return {"impressions": len(sizes), **summary(p, y, bins=bins), "logloss_ci": list(percentile_interval(boots, boot.level))}
