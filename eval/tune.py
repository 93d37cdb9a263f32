"""Learned fusion: fit the prior weights (and the LLM's weight) on logged impressions.

Training lists come from impressions with a click: their logged candidates when present, else the
clicked ad against `n_random` uniformly sampled catalog ads plus `n_hard` ads from our own candidate
generator: with the softmax objective, a second list per impression whose click the candidate union
retrieved (so the model also learns to separate look-alikes in the full-catalog protocol; see retrieved_list). Users of
`exclude_users` (the impressions a report evaluates) are never fitted on. Each impression keeps its user
and how many negatives its rows hold out of how many it could have drawn (the catalog minus the user's
history and clicks; all of them for logged candidates), so the calibration can correct for the sampling.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from eval.bootstrap import percentile_interval, resamples
from selection.fusion import FusionModel, llm_feature
from retrieval.candidates import CandidateGenerator
from retrieval.features import FEATURES, build_profile
from retrieval.records import ImpressionRecord

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    X: np.ndarray  # (rows, len(FEATURES))
    y: np.ndarray  # (rows,) 0/1
    group: np.ndarray  # (rows,) impression number
    n_impressions: int
    skipped: int
    users: list[str] = field(default_factory=list)  # user id per impression
    negatives_kept: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per impression: negatives in its rows
    negatives_pool: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per impression: negatives they were drawn from
    lines_read: int = 0  # records pulled from the input, counting the one past the last used (the stop)
    lists: np.ndarray | None = None  # (rows,) list number: what the softmax objective ranks within (None: one per impression)

    def subset(self, impressions: np.ndarray) -> "TrainingSet":
        """The rows of the impressions where `impressions` (a bool per impression) is True, renumbered."""
        keep = np.asarray(impressions, dtype=bool)
        rows = keep[self.group]
        renum = np.cumsum(keep) - 1
        lists = None if self.lists is None else np.unique(self.lists[rows], return_inverse=True)[1]
        return TrainingSet(
            self.X[rows], self.y[rows], renum[self.group[rows]], int(keep.sum()), self.skipped,
            [u for u, k in zip(self.users, keep) if k], self.negatives_kept[keep], self.negatives_pool[keep], self.lines_read, lists,
        )  # fmt: skip

    def negative_rate(self) -> float:
        """Share of the available negatives the rows keep (1.0 for logged candidates): the r of the prior correction."""
        return float(self.negatives_kept.sum() / self.negatives_pool.sum()) if self.negatives_pool.sum() > 0 else 1.0


@dataclass(slots=True)
class PlannedImpression:
    """One training impression before its features: the rows to score (logged candidates, or the clicked
    ads + the random negatives, drawn in input order from the one seeded generator)."""

    line: int  # records pulled so far (this one included)
    user: str
    hist_rows: list[int]
    pos_rows: list[int]
    rows: list[int]
    taken: set[int] | None  # full-catalog: history ∪ clicked (what the hard negatives exclude); logged: None


@dataclass(slots=True)
class NotPlanned:
    line: int
    reason: str  # "excluded" (a user kept out) or "skipped" (no history or click in the catalog)


def plan_training(
    impressions: Iterable[ImpressionRecord], *, index, n_random: int, exclude_users: set[str] | None, seed: int,
):  # fmt: skip
    """Every record in order as a PlannedImpression or NotPlanned (cheap: ids to rows, the random draws)."""
    rng = np.random.default_rng(seed)
    for line, rec in enumerate(impressions, start=1):
        if exclude_users and rec.user_id in exclude_users:
            yield NotPlanned(line, "excluded")
            continue
        hist_rows, _ = index.rows(rec.history)
        pos_rows, _ = index.rows(rec.clicked)
        if not pos_rows or not hist_rows:
            yield NotPlanned(line, "skipped")
            continue
        if rec.candidates:
            rows, _ = index.rows(dict.fromkeys(rec.candidates))
            yield PlannedImpression(line, rec.user_id, hist_rows, pos_rows, list(rows), None)
            continue
        taken = set(hist_rows) | set(pos_rows)
        rows = list(dict.fromkeys(pos_rows))
        if n_random:
            draw = rng.choice(len(index), size=min(len(index), n_random + len(taken)), replace=False)
            rows += [int(r) for r in draw if int(r) not in taken][:n_random]
        yield PlannedImpression(line, rec.user_id, hist_rows, pos_rows, rows, taken)


def retrieved_list(cs, *, pos_rows: list[int], n: int, line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The list the full-catalog ranker is trained on: the clicked rows of the candidate union `cs` (generated
    as serving generates it, the history excluded) and `n` of its other rows drawn uniformly (seeded by the
    record's line), with the features generation computed; None when no click was retrieved.

    Only impressions whose click the union holds give one: the ranker never sees a click the union missed,
    and such clicks score below the union's rows on every prior (they were not retrieved because of it),
    so pairing them with the union's rows taught the fusion that a high prior means no click (the
    --n-hard 20 fit's dense weight of -2.29 and its fall to 0.71 sampled nDCG@10)."""
    hit = np.isin(cs.rows, np.asarray(pos_rows, dtype=np.int64))
    if not hit.any() or hit.all():
        return None
    neg = np.flatnonzero(~hit)
    if len(neg) > n:
        neg = np.sort(np.random.default_rng(line).choice(neg, size=n, replace=False))
    take = np.concatenate([np.flatnonzero(hit), neg])
    return cs.rows[take], cs.features[take], hit[take].astype(np.float64)


def featurize(p: PlannedImpression, *, generator: CandidateGenerator, recency_decay: float, n_hard: int):
    """(features, labels, list per row) of one planned impression, or None when its labels are all 0 or all 1.

    List 0 is the sampled list (logged candidates, or the clicks + random negatives); with `n_hard` a
    full-catalog impression whose click the candidate union retrieved adds list 1 (retrieved_list)."""
    profile = build_profile(generator.index, p.hist_rows, decay=recency_decay)
    rows = list(p.rows)
    pos = set(p.pos_rows)
    y = np.array([1.0 if r in pos else 0.0 for r in rows])
    if y.sum() == 0 or y.sum() == len(y):
        return None
    X = generator.score_logged(profile, rows).features
    lists = np.zeros(len(y), dtype=np.int64)
    if n_hard and p.taken is not None:
        union = retrieved_list(generator.generate(profile, exclude=set(p.hist_rows)), pos_rows=p.pos_rows, n=n_hard, line=p.line)
        if union is not None:
            X, y = np.vstack([X, union[1]]), np.concatenate([y, union[2]])
            lists = np.concatenate([lists, np.ones(len(union[2]), dtype=np.int64)])
    return X, y, lists


def build_training_set(
    impressions: Iterable[ImpressionRecord],
    *,
    generator: CandidateGenerator,
    recency_decay: float,
    n_random: int = 19,
    n_hard: int = 0,
    exclude_users: set[str] | None = None,
    max_impressions: int | None = None,
    seed: int = 0,
    featurize_many=None,
    chunk: int = 1,
) -> TrainingSet:
    """The training rows, impression by impression in input order.

    `featurize_many(planned list) -> results in order` replaces the in-process `featurize` (eval tune
    --ray: actors), fed `chunk` planned impressions at a time; the rows, the skips and `lines_read` are
    the ones the one-at-a-time loop gives, whatever the chunk."""
    plan = plan_training(impressions, index=generator.index, n_random=n_random, exclude_users=exclude_users, seed=seed)
    many = featurize_many or (lambda ps: [featurize(p, generator=generator, recency_decay=recency_decay, n_hard=n_hard) for p in ps])
    index = generator.index
    Xs, ys, gs, ls, users, kept, pool = [], [], [], [], [], [], []
    n = skipped = lines = n_lists = 0
    done = False

    def take(buffer: list) -> None:
        nonlocal n, skipped, lines, done, n_lists
        results = iter(many([b for b in buffer if isinstance(b, PlannedImpression)]))
        for item in buffer:
            lines = item.line
            if max_impressions is not None and n >= max_impressions:
                done = True  # the one-at-a-time loop pulled this record and stopped
                return
            if isinstance(item, NotPlanned):
                skipped += item.reason == "skipped"
                continue
            out = next(results)
            if out is None:
                skipped += 1
                continue
            Xs.append(out[0])
            ys.append(out[1])
            gs.append(np.full(len(out[1]), n))
            ls.append(n_lists + out[2])
            n_lists += int(out[2].max()) + 1
            users.append(item.user)
            n_neg = float(len(out[1]) - out[1].sum())
            kept.append(n_neg)  # logged candidates: every negative the user was shown is a row (nothing sampled)
            pool.append(n_neg if item.taken is None else float(len(index) - len(item.taken)))
            n += 1

    buffer: list = []
    planned = 0
    for item in plan:
        buffer.append(item)
        planned += isinstance(item, PlannedImpression)
        if planned >= chunk or (max_impressions is not None and n >= max_impressions):
            take(buffer)
            buffer, planned = [], 0
            if done:
                break
    if buffer and not done:
        take(buffer)
    if not Xs:
        raise ValueError("no usable training impressions (need a history and a click in the catalog)")
    return TrainingSet(
        np.vstack(Xs), np.concatenate(ys), np.concatenate(gs), n, skipped, users, np.array(kept), np.array(pool), lines,
        np.concatenate(ls),
    )  # fmt: skip


OBJECTIVES = ("logistic", "softmax")  # pointwise log loss per row; listwise cross-entropy per impression


def fit_fusion(
    ts: TrainingSet,
    *,
    interactions: bool = True,
    C: float = 1.0,
    objective: str = "logistic",
    meta: dict | None = None,
) -> FusionModel:
    """A linear score over standardised prior features (+ pairwise products), fitted by `objective`:
    `logistic` (each row's click, pointwise) or `softmax` (each impression's clicked rows against the
    others in its list: the ranking the eval measures; the score has no intercept and its scale is the
    softmax's, which the separate calibration fit maps to a probability). The serving score is the same
    expanded dot product either way."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown fusion objective {objective!r} ({', '.join(OBJECTIVES)})")
    mean = ts.X.mean(axis=0)
    scale = ts.X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    pairs = [(i, j) for i in range(len(FEATURES)) for j in range(i, len(FEATURES))] if interactions else []
    model = FusionModel(list(FEATURES), mean, scale, np.zeros(len(FEATURES) + len(pairs)), 0.0, pairs)
    Z = model.expand(ts.X)
    if objective == "softmax":
        model.coef, fit_info = fit_listwise_softmax(Z, ts.y, ts.group if ts.lists is None else ts.lists, C=C)
    else:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=C, max_iter=5000)
        lr.fit(Z, ts.y)
        model.coef = lr.coef_.ravel().astype(np.float64)
        model.intercept = float(lr.intercept_[0])
        fit_info = None
    model.meta = {
        "source": "adselect eval tune",
        "train_impressions": ts.n_impressions,
        "train_rows": int(len(ts.y)),
        "skipped": ts.skipped,
        "C": C,
        "objective": objective,
        **({"objective_fit": fit_info} if fit_info else {}),
        **(meta or {}),
    }
    return model


def _group_logsumexp(s: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    step = np.diff(group)
    if len(group) and group[0] == 0 and group[-1] == n - 1 and step.min(initial=0) >= 0 and step.max(initial=0) <= 1:
        top = np.maximum.reduceat(s, np.flatnonzero(np.r_[True, step != 0]))  # rows in list order, every list present: fast path
    else:
        top = np.full(n, -np.inf)
        np.maximum.at(top, group, s)
    top = np.where(np.isfinite(top), top, 0.0)  # a list with no finite score (no clicked row): log(0) = -inf below
    return top + np.log(np.bincount(group, weights=np.exp(s - top[group]), minlength=n))


def listwise_softmax_loss(w: np.ndarray, Z: np.ndarray, y: np.ndarray, group: np.ndarray, *, l2: float) -> tuple[float, np.ndarray]:
    """Mean over impressions of −log(Σ_clicked e^s / Σ_all e^s), s = Z·w, plus l2·|w|²; and its gradient."""
    n = int(group.max()) + 1
    s = Z @ w
    lse_all = _group_logsumexp(s, group, n)
    pos = y > 0
    lse_pos = _group_logsumexp(np.where(pos, s, -np.inf), group, n)
    loss = float(np.mean(lse_all - lse_pos)) + l2 * float(w @ w)
    p_all = np.exp(s - lse_all[group])
    p_pos = np.where(pos, np.exp(np.minimum(s - lse_pos[group], 0.0)), 0.0)  # clicked rows: s ≤ lse_pos
    grad = Z.T @ (p_all - p_pos) / n + 2.0 * l2 * w
    return loss, grad


def fit_listwise_softmax(Z: np.ndarray, y: np.ndarray, group: np.ndarray, *, C: float = 1.0, max_iter: int = 500) -> tuple[np.ndarray, dict]:
    """Coefficients minimising the listwise softmax cross-entropy (L-BFGS), L2 penalty |w|²/(2·C·impressions)
    on the mean loss (sklearn's C on a per-list sum). Lists without a click or without a
    negative carry no ranking signal and are left out."""
    from scipy.optimize import minimize

    group = np.asarray(group, dtype=np.int64)
    n = int(group.max()) + 1
    clicks = np.bincount(group, weights=(y > 0).astype(float), minlength=n)
    size = np.bincount(group, minlength=n)
    useful = (clicks > 0) & (clicks < size)
    keep = useful[group]
    renum = np.cumsum(useful) - 1
    Zk, yk, gk = Z[keep], y[keep], renum[group[keep]]
    l2 = 1.0 / (2.0 * C * max(int(useful.sum()), 1))
    res = minimize(
        lambda w: listwise_softmax_loss(w, Zk, yk, gk, l2=l2), np.zeros(Z.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    info = {"loss": float(res.fun), "iterations": int(res.nit), "converged": bool(res.success), "lists": int(useful.sum()), "l2": l2}
    if not res.success:
        log.warning("listwise fusion fit stopped before converging", extra={"reason": str(res.message), "iterations": int(res.nit)})
    return res.x.astype(np.float64), info


def fit_llm_weight(
    prior: np.ndarray,
    llm_ranks: list[int | None],
    y: np.ndarray,
    *,
    C: float = 1.0,
    groups: np.ndarray | None = None,
    sent_ranks: list[int] | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[float, dict]:
    """Listwise mode's LLM weight (`llm_coef`): `fit_llm_term` with the LLM's rank and the shown rank (each
    row's position in the list the LLM was shown, 0 = first) through the serving transform
    selection.fusion.llm_feature (1/(1+rank); unranked 0)."""
    f = np.array([llm_feature(r, len(llm_ranks)) for r in llm_ranks])
    position = None if sent_ranks is None else np.array([llm_feature(r, len(sent_ranks)) for r in sent_ranks])
    return fit_llm_term(prior, f, y, C=C, groups=groups, position=position, n_boot=n_boot, seed=seed)


def fit_llm_term(
    prior: np.ndarray,
    llm: np.ndarray,
    y: np.ndarray,
    *,
    C: float = 1.0,
    groups: np.ndarray | None = None,
    position: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> tuple[float, dict]:
    """The LLM's say, earned: returns (the weight to ship, the fits), the weight in prior-score units (≥ 0).

    `llm` is the LLM term per row as serving adds it (listwise: llm_feature of the rank; scoring mode: the
    averaged label log-probability), `position` a feature of where the row was shown, larger where a
    position-following model puts it higher (listwise: llm_feature of the shown rank; scoring mode: the
    position-only LLM term, eval.tune_score.position_control). `llm_top_was_shown_first`: how often the
    LLM's top row sits at its impression's largest position feature.
    Plain fit: logistic y ~ a·prior + b·llm (`weight` = b/a, 0 when b ≤ 0). With `groups` (one id per
    impression), `weight_ci` / `llm_coef_raw_ci` come from refits on impressions resampled `n_boot` times
    (eval.bootstrap), and `share_positive` is how often b > 0. With `position`, `position_control` refits
    with it as a third feature: a small model that mostly echoes the order it is shown earns b in the plain
    fit from the prior order alone, and loses it here.

    The shipped weight is decided by `decide_llm_weight` (recorded under `shipped`): the position-controlled
    fit's b_c/a_c, and 0 unless that fit's interval for b_c lies above 0.
    """
    from sklearn.linear_model import LogisticRegression

    def coefs(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return LogisticRegression(C=C, max_iter=2000).fit(X, y).coef_.ravel()

    X = np.column_stack([prior, np.asarray(llm, dtype=np.float64)])
    a, b = (float(v) for v in coefs(X, y))
    weight = max(0.0, b / a) if a > 1e-9 else 0.0
    info: dict = {"prior_coef": a, "llm_coef_raw": b, "weight": weight, "rows": int(len(y))}
    Xc = None
    rows_of: list[np.ndarray] | None = None
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        rows_of = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)] if len(inverse) else []
    if position is not None:
        Xc = np.column_stack([X, np.asarray(position, dtype=np.float64)])
        coef = coefs(Xc, y)
        info["position_control"] = {
            "weight": max(0.0, float(coef[1] / coef[0])) if coef[0] > 1e-9 else 0.0,
            "prior_coef": float(coef[0]),
            "llm_coef_raw": float(coef[1]),
            "sent_position_coef": float(coef[2]),
            "llm_top_was_shown_first": _top_shown_first(Xc[:, 1], Xc[:, 2], rows_of),
            "llm_position_corr": _corr(Xc[:, 1], Xc[:, 2]),
        }
    if rows_of is not None and n_boot:
        rng = np.random.default_rng(seed)
        ws, bs, cs, cws = [], [], [], []
        for pick in (p for chunk in resamples(len(rows_of), n_boot=n_boot, rng=rng) for p in chunk):
            take = np.concatenate([rows_of[g] for g in pick])
            if y[take].min() == y[take].max():
                continue  # one class only: no fit
            ab = coefs(X[take], y[take])
            bs.append(float(ab[1]))
            ws.append(max(0.0, ab[1] / ab[0]) if ab[0] > 1e-9 else 0.0)
            if Xc is not None:
                abc = coefs(Xc[take], y[take])
                cs.append(float(abc[1]))
                cws.append(max(0.0, abc[1] / abc[0]) if abc[0] > 1e-9 else 0.0)
        if bs:
            info["bootstrap"] = {"n": len(bs), "resampled": "impressions", "seed": seed}
            info["llm_coef_raw_ci"] = list(percentile_interval(bs))
            info["weight_ci"] = list(percentile_interval(ws))
            info["share_positive"] = float(np.mean(np.array(bs) > 0))
            if cs:
                info["position_control"]["llm_coef_raw_ci"] = list(percentile_interval(cs))
                info["position_control"]["weight_ci"] = list(percentile_interval(cws))
                info["position_control"]["share_positive"] = float(np.mean(np.array(cs) > 0))
    info["shipped"] = decide_llm_weight(info)
    return info["shipped"]["weight"], info


def _top_shown_first(llm: np.ndarray, position: np.ndarray, rows_of: list[np.ndarray] | None) -> float | None:
    """Share of impressions whose LLM top row (the first with the impression's largest LLM term) has the
    impression's largest position feature (listwise: shown first); None without impressions."""
    if not rows_of:
        return None
    hits = [float(position[r[int(np.argmax(llm[r]))]] >= position[r].max() - 1e-12) for r in rows_of if len(r)]
    return float(np.mean(hits)) if hits else None


MAX_LLM_POSITION_CORR = 0.99  # above this the LLM feature is the shown position: the controlled fit just splits one coefficient


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def decide_llm_weight(info: dict) -> dict:
    """Which fit's LLM weight ships, and why: only the position-controlled fit's, and only when its
    bootstrap interval for the LLM coefficient excludes 0 and the LLM's ranking is not (nearly) the shown
    order itself (otherwise 0). The plain fit is confounded with the shown position (the LLM is shown the
    prior order) and never ships."""
    pc = info.get("position_control")
    out: dict = {"fit": "position_control", "plain_fit_weight": info.get("weight")}
    if pc is None:
        return {**out, "weight": 0.0, "reason": "no_position_control: the shown positions were not given"}
    ci = pc.get("llm_coef_raw_ci")
    out["candidate_weight"] = pc["weight"]
    out["llm_coef_raw_ci"] = ci
    if ci is None:
        return {**out, "weight": 0.0, "reason": "no_interval: no bootstrap of the position-controlled fit"}
    corr = pc.get("llm_position_corr")
    if corr is None or corr >= MAX_LLM_POSITION_CORR:
        return {**out, "weight": 0.0, "reason": f"confounded: the LLM's ranking follows the shown order (correlation {corr}); no fit can tell them apart"}
    if ci[0] <= 0.0:
        return {**out, "weight": 0.0, "reason": "ci_includes_zero: the position-controlled LLM coefficient's interval reaches 0"}
    if pc["weight"] <= 0.0:
        return {**out, "weight": 0.0, "reason": "prior_not_positive: the position-controlled fit gives the prior no positive weight"}
    return {**out, "weight": pc["weight"], "reason": "ci_excludes_zero: the position-controlled LLM coefficient is positive in its whole interval"}
