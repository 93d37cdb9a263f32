"""Learned fusion: fit the prior weights (and the LLM's weight) on logged impressions.

Training lists come from impressions with a click: their logged candidates when present, else the
clicked ad against `n_random` uniformly sampled catalog ads plus `n_hard` ads from our own candidate
generator (so the model also learns to separate look-alikes in the full-catalog protocol). Users of
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

    def subset(self, impressions: np.ndarray) -> "TrainingSet":
        """The rows of the impressions where `impressions` (a bool per impression) is True, renumbered."""
        keep = np.asarray(impressions, dtype=bool)
        rows = keep[self.group]
        renum = np.cumsum(keep) - 1
        return TrainingSet(
            self.X[rows], self.y[rows], renum[self.group[rows]], int(keep.sum()), self.skipped,
            [u for u, k in zip(self.users, keep) if k], self.negatives_kept[keep], self.negatives_pool[keep], self.lines_read,
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


def hard_negatives(by_source: dict[str, np.ndarray], *, taken: set[int], n: int) -> list[int]:
    """`n` look-alike negatives from the candidate generator, taken round-robin over its sources (each one's
    best first), so every source's kind of near miss is represented: the union's own order puts one
    source's rows first, and negatives from it alone teach the fusion to score that source down."""
    out: list[int] = []
    seen = set(taken)
    lists = [iter(np.asarray(v).tolist()) for v in by_source.values()]
    while len(out) < n and lists:
        for it in list(lists):
            for r in it:
                if r not in seen:
                    seen.add(r)
                    out.append(int(r))
                    break
            else:
                lists.remove(it)
            if len(out) == n:
                break
    return out


def featurize(p: PlannedImpression, *, generator: CandidateGenerator, recency_decay: float, n_hard: int):
    """(features, labels) of one planned impression, or None when its labels are all 0 or all 1."""
    profile = build_profile(generator.index, p.hist_rows, decay=recency_decay)
    rows = list(p.rows)
    if n_hard and p.taken is not None:
        rows += hard_negatives(generator.generate(profile, exclude=p.taken).by_source, taken=set(rows) | p.taken, n=n_hard)
    pos = set(p.pos_rows)
    y = np.array([1.0 if r in pos else 0.0 for r in rows])
    if y.sum() == 0 or y.sum() == len(y):
        return None
    return generator.score_logged(profile, rows).features, y


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
    Xs, ys, gs, users, kept, pool = [], [], [], [], [], []
    n = skipped = lines = 0
    done = False

    def take(buffer: list) -> None:
        nonlocal n, skipped, lines, done
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
    )  # fmt: skip


def fit_fusion(
    ts: TrainingSet,
    *,
    interactions: bool = True,
    C: float = 1.0,
    meta: dict | None = None,
) -> FusionModel:
    """Logistic regression over standardised prior features (+ pairwise products)."""
    from sklearn.linear_model import LogisticRegression

    mean = ts.X.mean(axis=0)
    scale = ts.X.std(axis=0)
    scale[scale < 1e-9] = 1.0
    pairs = [(i, j) for i in range(len(FEATURES)) for j in range(i, len(FEATURES))] if interactions else []
    model = FusionModel(list(FEATURES), mean, scale, np.zeros(len(FEATURES) + len(pairs)), 0.0, pairs)
    Z = model.expand(ts.X)
    lr = LogisticRegression(C=C, max_iter=5000)
    lr.fit(Z, ts.y)
    model.coef = lr.coef_.ravel().astype(np.float64)
    model.intercept = float(lr.intercept_[0])
    model.meta = {
        "source": "adselect eval tune",
        "train_impressions": ts.n_impressions,
        "train_rows": int(len(ts.y)),
        "skipped": ts.skipped,
        "C": C,
        **(meta or {}),
    }
    return model


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
