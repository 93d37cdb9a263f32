"""Off-policy estimators: what a target policy's CTR (or revenue) would have been on logged traffic.

Data: n logged impressions, each with its first k served positions. For position j of impression i:
    r[i, j]   the reward observed there (click 0/1, or bid × click for revenue)
    pb[i, j]  the logging policy's propensity of the served ad there given the ads above it
    pe[i, j]  the target policy's probability of that same ad there given the same ads above it
              (0/1 for a deterministic target: does the target serve it, after the logged prefix?)
    qb[i, j]  the direct model's expected reward of the logged ad at j (DR only)
    qe[i, j]  the direct model's expected reward at j under the target, after the logged prefix (DR only)

Importance weights are prefix products, w[i, j] = Π_{l ≤ j} pe[i, l] / pb[i, l] (w[i, 0] = 1 before the
first position), optionally clipped from above at `clip` (biased, lower variance). The value is the
expected total reward per impression (for k = 1: the CTR):

    IPS    V = 1/n Σ_i Σ_j w_ij r_ij
    SNIPS  V = Σ_j (Σ_i w_ij r_ij) / (Σ_i w_ij)                       (self-normalised per position)
    DR     V = 1/n Σ_i Σ_j [ w_i,j-1 qe_ij + w_ij (r_ij − qb_ij) ]

For k = 1 these are the textbook IPS, SNIPS and doubly robust estimators (Dudík et al. 2014). For slates
(k > 1) they are the cascade ("reward interaction") IPS of McInerney et al. 2020 and the cascade DR of
Kiyohara et al. 2022: unbiased when the reward at a position depends only on the ads at and above it
(a position-decay examination model satisfies this), with far less variance than the whole-slate IPS.
The logged `propensity` of selection.exploration is exactly pb. Each estimate comes with a bootstrap
percentile CI (impressions resampled, seeded) and the effective sample size ESS = (Σ w)² / Σ w² of the
whole-slate weights w[:, k-1].

A percentile bootstrap is only as good as the sample it resamples: `warnings` names the two cases where its
interval is not to be trusted (`reliability_warnings`): an ESS below LOW_ESS (a handful of impressions carry
the estimate), and no reward at all where the target has weight (every resample is 0, so the interval is
[0, 0] whatever the truth).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

ESTIMATORS = ("ips", "snips", "dr")
LOW_ESS = 30.0  # below this many effective impressions the bootstrap's coverage is not to be relied on


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    ci: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci": [self.ci[0], self.ci[1]]}


@dataclass(frozen=True, slots=True)
class OPEResult:
    n: int
    k: int
    ess: float  # of the whole-slate weights
    ips: Estimate
    snips: Estimate
    dr: Estimate | None  # None without a direct model
    clip: float | None
    ess_by_position: list[float] = field(default_factory=list)
    mean_weight: float = 1.0  # ≈ 1 when the propensities are right and the target's support is covered
    skipped: int = 0  # records that could not be used (fewer than k served ads)
    warnings: list[str] = field(default_factory=list)  # reliability_warnings(): why the intervals may not hold

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "k": self.k,
            "ess": self.ess,
            "ess_by_position": self.ess_by_position,
            "mean_weight": self.mean_weight,
            "clip": self.clip,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "ips": self.ips.to_json(),
            "snips": self.snips.to_json(),
        }
        if self.dr is not None:
            out["dr"] = self.dr.to_json()
        return out


@dataclass(frozen=True)
class LoggedData:
    """Arrays of shape (n, k) as described in the module docstring (a (n,) array is taken as k = 1)."""

    reward: np.ndarray
    logging_propensity: np.ndarray
    target_propensity: np.ndarray
    direct_logged: np.ndarray | None = None
    direct_target: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("reward", "logging_propensity", "target_propensity", "direct_logged", "direct_target"):
            v = getattr(self, name)
            if v is not None:
                a = np.asarray(v, dtype=np.float64)
                object.__setattr__(self, name, a.reshape(-1, 1) if a.ndim == 1 else a)
        shape = self.reward.shape
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"reward must be (n, k) with n, k >= 1, got {shape}")
        for name in ("logging_propensity", "target_propensity", "direct_logged", "direct_target"):
            v = getattr(self, name)
            if v is not None and v.shape != shape:
                raise ValueError(f"{name} has shape {v.shape}, reward has {shape}")
        if (self.direct_logged is None) != (self.direct_target is None):
            raise ValueError("DR needs both direct_logged and direct_target")
        pb = self.logging_propensity
        if not (np.all(pb > 0) and np.all(pb <= 1)):
            raise ValueError("logging propensities must be in (0, 1]")
        if not (np.all(self.target_propensity >= 0) and np.all(self.target_propensity <= 1)):
            raise ValueError("target propensities must be in [0, 1]")


def prefix_weights(data: LoggedData, *, clip: float | None = None) -> np.ndarray:
    """w[i, j] = Π_{l ≤ j} pe/pb, clipped from above at `clip`."""
    w = np.cumprod(data.target_propensity / data.logging_propensity, axis=1)
    return np.minimum(w, clip) if clip is not None else w


def _terms(data: LoggedData, w: np.ndarray) -> dict[str, np.ndarray]:
    """Per-impression quantities every estimator is a function of (sums over rows), for the bootstrap."""
    t = {"ips": (w * data.reward).sum(axis=1), "wr": w * data.reward, "w": w}
    if data.direct_logged is not None:
        w_prev = np.hstack([np.ones((w.shape[0], 1)), w[:, :-1]])
        t["dr"] = (w_prev * data.direct_target + w * (data.reward - data.direct_logged)).sum(axis=1)
    return t


def _values(sums: dict[str, np.ndarray], n: float | np.ndarray) -> dict[str, np.ndarray]:
    """Estimator values from row sums (works on one resample or a batch: leading axis = resamples)."""
    w = sums["w"]
    with np.errstate(invalid="ignore", divide="ignore"):
        sn = np.where(w > 0, sums["wr"] / np.where(w > 0, w, 1.0), 0.0).sum(axis=-1)
    out = {"ips": sums["ips"] / n, "snips": sn}
    if "dr" in sums:
        out["dr"] = sums["dr"] / n
    return out


def effective_sample_size(w: np.ndarray) -> float:
    s2 = float(np.square(w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def reliability_warnings(data: LoggedData, w: np.ndarray, *, ess: float) -> list[str]:
    """Why an estimate's bootstrap interval may not hold (see the module docstring); [] when none applies."""
    out = []
    if ess < LOW_ESS:
        out.append(f"low_ess: the target's weights leave {ess:.1f} effective impressions of {len(w)} (< {LOW_ESS:g})")
    if not np.any((w > 0) & (data.reward != 0)):
        out.append("no_reward_in_support: no logged reward where the target has weight; every interval is degenerate")
    return out


def estimate(
    data: LoggedData,
    *,
    clip: float | None = None,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    skipped: int = 0,
) -> OPEResult:
    """IPS, SNIPS and (with a direct model) DR, each with a bootstrap (1 − alpha) percentile CI."""
    if clip is not None and not clip > 0:
        raise ValueError("clip must be > 0")
    w = prefix_weights(data, clip=clip)
    terms = _terms(data, w)
    n, k = data.reward.shape
    point = _values({name: v.sum(axis=0) for name, v in terms.items()}, n)
    boots = _bootstrap(terms, n=n, n_bootstrap=n_bootstrap, seed=seed)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)

    def est(name: str) -> Estimate:
        b = boots[name]
        return Estimate(float(point[name]), (float(np.percentile(b, lo)), float(np.percentile(b, hi))))

    ess = effective_sample_size(w[:, -1])
    return OPEResult(
        n=n,
        k=k,
        ess=ess,
        ess_by_position=[effective_sample_size(w[:, j]) for j in range(k)],
        mean_weight=float(w[:, -1].mean()),
        ips=est("ips"),
        snips=est("snips"),
        dr=est("dr") if "dr" in terms else None,
        clip=clip,
        skipped=skipped,
        warnings=reliability_warnings(data, w, ess=ess),
    )


def _bootstrap(terms: dict[str, np.ndarray], *, n: int, n_bootstrap: int, seed: int, chunk: int = 100) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.full(n, 1.0 / n)
    out: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        counts = rng.multinomial(n, p, size=b).astype(np.float64)  # (b, n): how often each impression is drawn
        sums = {name: counts @ (v if v.ndim == 2 else v[:, None]) for name, v in terms.items()}
        sums = {name: (s[:, 0] if terms[name].ndim == 1 else s) for name, s in sums.items()}
        for name, v in _values(sums, float(n)).items():
            out.setdefault(name, []).append(v)
        done += b
    return {name: np.concatenate(v) for name, v in out.items()}


# ---- from impression-log records (joined with feedback) ------------------------------------------

Target = Callable[[Mapping[str, Any]], Sequence[str]]  # record -> the target's ranking (ad ids, best first)
DirectModel = Callable[[Mapping[str, Any], str, int], float]  # (record, ad id, position) -> expected reward


def logged_pctr(record: Mapping[str, Any], ad_id: str, position: int) -> float:
    """The direct model the service itself logged: the fused pCTR of a scored candidate (0 when unknown)."""
    for s in record.get("scored") or ():
        if s.get("ad_id") == ad_id and s.get("pctr") is not None:
            return float(s["pctr"])
    for s in record.get("served_ads") or ():
        if s.get("ad_id") == ad_id and s.get("pctr") is not None:
            return float(s["pctr"])
    return 0.0


def target_choice(ranking: Sequence[str], prefix: Sequence[str]) -> str | None:
    """A deterministic ranking policy's ad at the next position after `prefix`: its best ad not yet shown."""
    shown = set(prefix)
    return next((a for a in ranking if a not in shown), None)


def logged_data_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    target: Target,
    k: int = 1,
    reward: Literal["click", "revenue"] = "click",
    direct: DirectModel | None = None,
) -> tuple[LoggedData, int]:
    """Arrays for `estimate` from joined log records and a deterministic target; also how many records were skipped.

    A record is used when it served at least k ads (its first k positions are evaluated). `reward="revenue"`
    scores bid × click; the direct model must then return expected revenue."""
    r, pb, pe, qb, qe = [], [], [], [], []
    skipped = 0
    for rec in records:
        served = list(rec.get("served_ads") or [])[:k]
        if len(served) < k:
            skipped += 1
            continue
        ranking = list(target(rec))
        clicked = set(rec.get("clicked") or ())
        ids = [s["ad_id"] for s in served]
        row_r, row_pb, row_pe, row_qb, row_qe = [], [], [], [], []
        for j, s in enumerate(served):
            click = 1.0 if s["ad_id"] in clicked else 0.0
            row_r.append(click * float(s.get("bid") or 0.0) if reward == "revenue" else click)
            row_pb.append(float(s.get("propensity", 1.0)))
            choice = target_choice(ranking, ids[:j])
            row_pe.append(1.0 if choice == s["ad_id"] else 0.0)
            if direct is not None:
                row_qb.append(float(direct(rec, s["ad_id"], j)))
                row_qe.append(float(direct(rec, choice, j)) if choice is not None else 0.0)
        r.append(row_r), pb.append(row_pb), pe.append(row_pe), qb.append(row_qb), qe.append(row_qe)
    if not r:
        raise ValueError(f"no record served {k} ads")
    data = LoggedData(
        reward=np.array(r),
        logging_propensity=np.array(pb),
        target_propensity=np.array(pe),
        direct_logged=np.array(qb) if direct is not None else None,
        direct_target=np.array(qe) if direct is not None else None,
    )
    return data, skipped


def evaluate_records(
    records: Sequence[Mapping[str, Any]],
    *,
    target: Target,
    k: int = 1,
    reward: Literal["click", "revenue"] = "click",
    direct: DirectModel | None = logged_pctr,
    clip: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> OPEResult:
    """One target variant on joined log records: IPS, SNIPS, DR (+ CIs), n and ESS."""
    data, skipped = logged_data_from_records(records, target=target, k=k, reward=reward, direct=direct)
    return estimate(data, clip=clip, n_bootstrap=n_bootstrap, seed=seed, skipped=skipped)

