"""Refit the pCTR calibration on real feedback: the served ads of the impression log joined with clicks.

Rows are the served ads of records logged under the given weights (their `weights_version`; another
version's scores are on another scale), optionally of one arm, labelled clicked or not. Users (the
record's keyed user hash) are split by a second keyed hash (eval.calibration.user_share) into a fitting
part and a held-out part (`holdout` share), so no user is on both sides. Each row carries its place among the record's
scored candidates (selection.fusion.list_context over the logged `scored` scores: the list the service
computed the pCTR over), which the list-aware `platt_list` needs. The method (platt, isotonic or platt_list,
`method="auto"`) is chosen by cross-validated log loss over folds of the fitting users, fitted on the
fitting part and judged on the held-out part with eval.calibration.summary (log loss, normalised entropy,
Σp/Σy, ECE over `bins` quantile bins, the reliability table) and ece_uncertainty (bootstrap interval,
noise floor; and, since a simulated user shown the same ad again clicks again, per cluster of user + ad:
the floor of that many independent outcomes). `cross_fitted` judges the same method on every row instead: each row predicted by a fit on
the other folds' users (more rows, so a lower noise floor; the shipped fit is the fitting part's).

The rows are the service's own impressions, not sampled negatives, so no negative-sampling correction
applies (eval tune's sampled rows are corrected, see eval.calibration.fit_calibration). The refit weights
keep the fusion coefficients and replace `calibration`; POST /admin/reload serves them. platt and
isotonic are monotone in the score, so the relevance order never changes; platt_list is monotone within a
list when a + w[log_share] + w[margin] + min(0, w[share]) > 0 (the report's `monotone_in_list`), else
bid × pCTR may order a list differently from its scores.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval.calibration import ECE_BINS, HOLDOUT_SHARE, METHODS, apply_calibration, choose_method, cross_fitted, ece_uncertainty, fit_calibration, summary, user_share
from kernel.errors import UserError
from selection.fusion import LIST_TERMS, FusionModel, list_context


@dataclass(frozen=True)
class ServedRows:
    scores: np.ndarray  # fused score of each served ad
    y: np.ndarray  # clicked 1/0
    users: list[str]  # the record's keyed user hash
    context: dict[str, np.ndarray]  # list_context of each served ad within its record's scored candidates
    clusters: list[str]  # user + ad: rows that share one outcome (the same user shown the same ad again)
    arms: list[str]  # the record's arm


def served_rows(records: Sequence[Mapping[str, Any]], *, weights_version: str | None, arm: str | None = None) -> ServedRows:
    """Each served ad of the records logged under `weights_version` (None: all) and `arm` (None: all)."""
    s, y, users, ctx, clusters, arms = [], [], [], {t: [] for t in LIST_TERMS}, [], []
    for r in records:
        if weights_version is not None and r.get("weights_version") != weights_version:
            continue
        if arm is not None and r.get("arm") != arm:
            continue
        clicked = set(r.get("clicked") or ())
        served = [a for a in r.get("served_ads") or () if a.get("score") is not None]
        scored = [c for c in r.get("scored") or () if c.get("score") is not None]
        listed = {c["ad_id"]: i for i, c in enumerate(scored)}
        if not all(a["ad_id"] in listed for a in served):  # no scored list logged: the served ads are the list
            scored, listed = served, {a["ad_id"]: i for i, a in enumerate(served)}
        lc = list_context(np.array([float(c["score"]) for c in scored]))
        for a in served:
            for t in LIST_TERMS:
                ctx[t].append(float(lc[t][listed[a["ad_id"]]]))
            s.append(float(a["score"]))
            y.append(1.0 if a["ad_id"] in clicked else 0.0)
            users.append(str(r.get("user_id") or r["request_id"]))
            clusters.append(f"{users[-1]}\x1f{a['ad_id']}")
            arms.append(str(r.get("arm")))
    return ServedRows(np.array(s), np.array(y), users, {t: np.array(v) for t, v in ctx.items()}, clusters, arms)


def monotone_in_list(cal: Mapping[str, Any]) -> bool:
    """Whether the pCTR increases with the score among one list's candidates (d logit / d score > 0 for
    every share in [0, 1]); platt and isotonic always do."""
    if cal.get("method") != "platt_list":
        return True
    w = cal["w"]
    return float(cal["a"]) + w.get("log_share", 0.0) + w.get("margin", 0.0) + min(0.0, w.get("share", 0.0)) > 0


def _judged(p: np.ndarray, y: np.ndarray, *, bins: int, seed: int, clusters: Sequence[str]) -> dict[str, Any]:
    return {**summary(p, y, bins=bins), **ece_uncertainty(p, y, bins=bins, seed=seed, clusters=clusters)}


def refit_calibration(
    records: Sequence[Mapping[str, Any]],
    fusion: FusionModel,
    *,
    weights_version: str | None,
    holdout: float = HOLDOUT_SHARE,
    bins: int = ECE_BINS,
    method: str = "auto",
    arm: str | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[FusionModel, dict[str, Any]]:
    """The weights with a calibration refit on the log's feedback, and the report (before/after on held-out users)."""
    rows = served_rows(records, weights_version=weights_version, arm=arm)
    scores, y, ctx = rows.scores, rows.y, rows.context
    if len(y) == 0:
        raise UserError("no served ads logged under these weights (check --weights against the log's weights_version)")
    if method != "auto" and method not in METHODS:
        raise UserError(f"unknown calibration method {method!r} (auto, {', '.join(METHODS)})")
    test = np.array([user_share(u) < holdout for u in rows.users])
    fit = ~test

    def part(mask: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[mask] for k, v in ctx.items()}

    if test.all() or not test.any() or y[fit].sum() == 0 or y[fit].sum() == fit.sum():
        raise UserError("too few rows (or no clicks / only clicks) to fit and hold out a calibration")
    fit_users = [u for u, f in zip(rows.users, fit) if f]
    cv_logloss = None
    if method == "auto":
        method, cv_logloss = choose_method(scores[fit], y[fit], fit_users, folds=folds, context=part(fit))
    cal = fit_calibration(scores[fit], y[fit], method=method, context=part(fit))
    block = {k: v for k, v in cal.items() if k in ("method", "a", "b", "x", "p", "w")}
    refit = FusionModel.from_json({**fusion.to_json(), "calibration": block})
    refit.meta = {**fusion.meta, "calibration_source": "impression log feedback", "calibration_rows": int(fit.sum())}
    held_clusters = [c for c, k in zip(rows.clusters, test) if k]
    p_after = apply_calibration(block, scores[test], context=part(test))
    held_arms = np.array([a for a, k in zip(rows.arms, test) if k])
    oof = cross_fitted(scores, y, rows.users, method=method, folds=folds, context=ctx)
    ok = ~np.isnan(oof)
    report = {
        "weights_version": weights_version,
        "arm": arm,
        "split": {"by": "keyed user hash (eval.calibration.user_share)", "holdout_share": holdout,
                  "fit_rows": int(fit.sum()), "holdout_rows": int(test.sum()),
                  "fit_users": len(set(fit_users)), "holdout_users": len({u for u, t in zip(rows.users, test) if t})},  # fmt: skip
        "method": method,
        "cv_logloss": cv_logloss,
        "folds": folds,
        "fit_rows": int(fit.sum()),
        "calibration": block,
        "monotone_in_list": monotone_in_list(block),
        "holdout_before": _judged(fusion.pctr(scores[test], context=part(test)), y[test], bins=bins, seed=seed, clusters=held_clusters),
        "holdout_after": _judged(p_after, y[test], bins=bins, seed=seed, clusters=held_clusters),
        # the same held-out rows per arm (one fit for all): whether one arm's served ads are miscalibrated
        "holdout_after_by_arm": {a: _judged(p_after[held_arms == a], y[test][held_arms == a], bins=bins, seed=seed,
                                            clusters=[c for c, h in zip(held_clusters, held_arms) if h == a])
                                 for a in sorted(set(held_arms.tolist()))} if len(set(held_arms.tolist())) > 1 else None,  # fmt: skip
        "cross_fitted": {"rows": int(ok.sum()), "note": f"every row predicted by a {method} fit on the other {folds - 1} folds' users",
                         **_judged(oof[ok], y[ok], bins=bins, seed=seed, clusters=[c for c, k in zip(rows.clusters, ok) if k])},  # fmt: skip
    }
    return refit, report


def reliability_plot(report: Mapping[str, Any], path) -> Any:
    """The report's reliability plot (held-out users before/after, and cross-fitted) as a PNG via eval.plots."""
    from eval.plots import plot_reliability

    parts = {name: report[key] for name, key in (("held-out, before", "holdout_before"), ("held-out, refit", "holdout_after"), ("cross-fitted", "cross_fitted")) if key in report}
    return plot_reliability({"calibration": parts, "config": {"name": f"calibration refit ({report.get('method')}, {parts['held-out, refit']['ece_bins']} quantile bins)"}}, path)
