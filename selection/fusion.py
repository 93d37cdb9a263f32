"""Fusion of prior features (and, when present, the LLM's ranking) into one score.

A logistic model over standardised features, optionally with pairwise products, saved as JSON: the
eval tooling fits it on logged impressions (`adselect eval tune`), the server and eval load it. The LLM
term enters only through its learned coefficient, so its say in the ranking is earned on logged data.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernel.errors import ConfigError
from retrieval.features import FEATURES

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = Path(__file__).with_name("default_weights.json")


def llm_feature(llm_rank: int | None, n: int) -> float:
    """The LLM's opinion of one candidate as a feature: 1 for its top pick, decaying; 0 if unranked."""
    if llm_rank is None:
        return 0.0
    return 1.0 / (1.0 + llm_rank)


LIST_TERMS = ("log_share", "share", "margin")  # platt_list's terms for the ad's place among the scored candidates


def list_context(scores: np.ndarray, *, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each row's place in its list of scored candidates (`groups`: a list id per row; None: one list, as
    the hot path scores one request's candidates): `log_share` = s − logsumexp(the list's scores) (its
    conditional-logit share of the list, log), `share` = exp(log_share), `margin` = s − max(the list's scores)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) == 0:
        return {k: np.zeros(0) for k in LIST_TERMS}
    if groups is None:
        top = np.full(len(s), s.max())
        lse = top + np.log(np.exp(s - top).sum())
    else:
        _, g = np.unique(np.asarray(groups), return_inverse=True)
        mx = np.full(g.max() + 1, -np.inf)
        np.maximum.at(mx, g, s)
        top = mx[g]
        lse = top + np.log(np.bincount(g, weights=np.exp(s - top))[g])
    log_share = s - lse
    return {"log_share": log_share, "share": np.exp(log_share), "margin": s - top}


def calibrated_pctr(
    cal: dict, scores: np.ndarray, *, context: dict[str, np.ndarray] | None = None, groups: np.ndarray | None = None
) -> np.ndarray:
    """THE pCTR formula of a calibration block (eval/calibration.py fits it; serving, the log's pCTR field,
    eval's reports and the refit all call this): `platt` sigmoid(a·score + b); `isotonic` linear
    interpolation between knots (x, p), constant beyond the end knots; `platt_list` sigmoid(a·score + b +
    Σ w[t]·term t of list_context) — the terms from `context` when given (rows picked out of their lists),
    else computed over `scores` (split into lists by `groups`; None: one list)."""
    s = np.asarray(scores, dtype=np.float64)
    method = cal.get("method", "platt")
    if method == "isotonic":
        return np.interp(s, cal["x"], cal["p"])
    z = float(cal.get("a", 1.0)) * s + float(cal.get("b", 0.0))
    if method == "platt_list":
        ctx = context if context is not None else list_context(s, groups=groups)
        for term, w in cal["w"].items():
            z = z + float(w) * np.asarray(ctx[term], dtype=np.float64).reshape(s.shape)
    return 1.0 / (1.0 + np.exp(-z))


def _checked_calibration(cal: dict) -> dict:
    """The calibration block, or ValueError (a reload refuses the file): platt needs a and b; isotonic
    needs knots x strictly increasing and p non-decreasing in [0, 1], of one length; platt_list needs a,
    b and finite weights w over LIST_TERMS."""
    method = cal.get("method", "platt")
    if method in ("platt", "platt_list"):
        if not all(math.isfinite(float(cal.get(k, 0.0))) for k in ("a", "b")):
            raise ValueError(f"{method} calibration needs finite a and b")
    if method == "platt_list":
        w = cal.get("w")
        if not isinstance(w, dict) or not w or set(w) - set(LIST_TERMS) or not all(math.isfinite(float(v)) for v in w.values()):
            raise ValueError(f"platt_list calibration needs weights w: a non-empty map of {', '.join(LIST_TERMS)} to finite numbers")
    elif method == "isotonic":
        x, p = np.asarray(cal.get("x", []), dtype=np.float64), np.asarray(cal.get("p", []), dtype=np.float64)
        if len(x) < 2 or len(x) != len(p) or np.any(np.diff(x) <= 0) or np.any(np.diff(p) < 0) or p.min() < 0 or p.max() > 1:
            raise ValueError("isotonic calibration needs knots x (strictly increasing) and p (non-decreasing, in [0, 1]) of one length >= 2")
    elif method != "platt":
        raise ValueError(f"unknown calibration method {method!r} (platt, isotonic, platt_list)")
    return dict(cal)


@dataclass
class FusionModel:
    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # over expanded features (base + pairwise products, see `interactions`)
    intercept: float = 0.0
    interactions: list[tuple[int, int]] = field(default_factory=list)
    llm_coef: float = 0.0  # weight of llm_feature(); 0 = the LLM cannot move the ranking
    meta: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=lambda: {"method": "platt", "a": 1.0, "b": 0.0})
    llm_score_coef: float = 0.0  # scoring mode: weight of the averaged label log-probability; 0 = no fit earned it a say
    _pairs_cache: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def pctr(self, scores: np.ndarray, *, groups: np.ndarray | None = None, context: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Calibrated click probability of the fused scores (calibrated_pctr of this calibration block):
        `scores` are one list of scored candidates unless `groups` splits them (a list id per row) or
        `context` gives each row's list terms (list_context of its own list)."""
        return calibrated_pctr(self.calibration, scores, context=context, groups=groups)

    def sampled_pctr(self, scores: np.ndarray, *, groups: np.ndarray | None = None, context: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """pCTR on the scale of the sampled rows the calibration was fitted on: the prior correction
        (logit p = logit p_sampled + log r, eval/calibration.py) undone. What a protocol that samples its
        negatives the same way should be judged against; `pctr` itself is the catalog-scale probability."""
        p = self.pctr(scores, groups=groups, context=context)
        offset = (self.calibration.get("prior_correction") or {}).get("log_odds_offset")
        if not offset:
            return p
        q = np.clip(p, 1e-15, 1 - 1e-15)
        return 1.0 / (1.0 + np.exp(-(np.log(q / (1 - q)) - float(offset))))

    @classmethod
    def hand_tuned(cls) -> "FusionModel":
        """Used only when no weights file exists at all: an equal-weight blend over standardised features.
        The LLM gets weight 0: no fit earned it a say in the ranking."""
        n = len(FEATURES)
        return cls(list(FEATURES), np.zeros(n), np.ones(n), np.ones(n) / n, 0.0, [], 0.0, {"source": "hand_tuned"})

    def expand(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean) / self.scale
        if self.interactions:
            I, J = self._pair_index()
            Z = np.hstack([Z, Z[:, I] * Z[:, J]])
        return Z

    def _pair_index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pairs_cache is None or len(self._pairs_cache[0]) != len(self.interactions):
            pairs = np.asarray(self.interactions, dtype=np.int64).reshape(-1, 2)
            self._pairs_cache = (pairs[:, 0], pairs[:, 1])
        return self._pairs_cache

    def prior_scores(self, X: np.ndarray) -> np.ndarray:
        """Scores without the LLM (the fast path and the default LLM-off system)."""
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        return self.expand(X) @ self.coef + self.intercept

    def fused_scores(self, prior: np.ndarray, llm_ranks: list[int | None]) -> np.ndarray:
        n = len(prior)
        return prior + self.llm_coef * np.array([llm_feature(r, n) for r in llm_ranks], dtype=np.float64)

    def fused_logprob_scores(self, prior: np.ndarray, logprobs: list[float | None]) -> np.ndarray:
        """Scoring mode: prior + llm_score_coef × the candidate's averaged log-probability (agent.scorer).
        A candidate that was not scored (None: beyond the candidates sent) gets the lowest scored value."""
        known = [v for v in logprobs if v is not None]
        floor = min(known) if known else 0.0
        return prior + self.llm_score_coef * np.array([floor if v is None else v for v in logprobs], dtype=np.float64)

    # ---- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "features": self.features,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "interactions": [list(p) for p in self.interactions],
            "llm_coef": self.llm_coef,
            "calibration": self.calibration,
            "meta": self.meta,
            # written only when set, so weights without a scoring-mode fit keep their content hash (weights_version)
            **({"llm_score_coef": self.llm_score_coef} if self.llm_score_coef else {}),
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def from_json(cls, d: dict) -> "FusionModel":
        """Weights fitted before a feature existed load with weight 0 for it (their scores are unchanged;
        `meta["missing_features"]` names them); a feature this build does not compute is a ValueError."""
        fitted = list(d["features"])
        unknown = [f for f in fitted if f not in FEATURES]
        if unknown or len(set(fitted)) != len(fitted):
            raise ValueError(f"weights were fitted on features {fitted}, this build computes {list(FEATURES)}")
        at = [FEATURES.index(f) for f in fitted]  # fitted column -> this build's column
        n_base = len(fitted)
        mean, scale = np.zeros(len(FEATURES)), np.ones(len(FEATURES))
        mean[at] = np.asarray(d["mean"], dtype=np.float64)
        scale[at] = np.asarray(d["scale"], dtype=np.float64)
        coef_in = np.asarray(d["coef"], dtype=np.float64)
        coef = np.concatenate([np.zeros(len(FEATURES)), coef_in[n_base:]])
        coef[at] = coef_in[:n_base]
        meta = dict(d.get("meta", {}))
        missing = [f for f in FEATURES if f not in fitted]
        if missing:
            meta["missing_features"] = missing
            log.warning("fusion weights were fitted without %s: weight 0 (refit with `adselect eval tune`)", missing)
        return cls(
            features=list(FEATURES),
            mean=mean,
            scale=scale,
            coef=coef,
            intercept=float(d.get("intercept", 0.0)),
            interactions=[(at[i], at[j]) for i, j in d.get("interactions", [])],
            llm_coef=float(d.get("llm_coef", 0.0)),
            llm_score_coef=float(d.get("llm_score_coef", 0.0)),
            meta=meta,
            calibration=_checked_calibration(d.get("calibration") or {"method": "platt", "a": 1.0, "b": 0.0}),
        )

    @classmethod
    def load(cls, path: Path | None) -> "FusionModel":
        """The given file (ConfigError if it is not there), else the shipped weights, else the hand-tuned blend."""
        if path is not None and not Path(path).is_file():
            raise ConfigError("weights_path", f"no such file: {path}")
        for p in (path, SHIPPED_WEIGHTS):
            if p is not None and Path(p).exists():
                m = cls.from_json(json.loads(Path(p).read_text()))
                m.meta.setdefault("path", str(p))
                return m
        return cls.hand_tuned()
