"""A traffic simulation that checks off-policy evaluation end to end on real users.

Real Amazon Games dev users (history, 20 logged candidates, the next purchase; or, `sampled_users`, the
full dev file's users with the same kind of list sampled per user) are served by a
*logging* arm with exploration on; a simulated user clicks a served ad when it is their logged next
purchase and they examined its position (position-decay examination, `decay ** position`; seeded).
Every decision goes to the impression log and every click to the feedback store, exactly as in
production; the joined log is then evaluated for each *target* variant, and the same users are served
on-policy by each target to measure its true CTR. The result says whether the estimators' CIs hold the truth.

The service is behind the `Service` seam:
- `StandInService` (used by the tests and by default): policies built from the candidates' popularity
  and co-visitation in the logged histories, exploration from selection.exploration, the log and the
  feedback store written in-process.
- The lead plugs the running endpoint in with a class of the same three methods (serve through
  `POST /v1/select` with the arm chosen, click through `POST /v1/events`, records read from the
  service's log dir joined with its feedback store) — see `Service`.
"""
from __future__ import annotations

import json
import math
import random
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from eval.ope import OPEResult, estimate, logged_data_from_records, logged_pctr
from eval.sample_logged import sampled_candidates
from selection.exploration import ExplorationConfig, explore
from selection.feedback import FeedbackStore, ServedAdRow
from selection.impression_log import JsonlImpressionLog, ScoredEntry, ServedEntry, build_record, iter_log_records


@dataclass(frozen=True, slots=True)
class SimUser:
    request_id: str
    user_id: str
    history: list[str]
    candidates: list[str]
    next_purchase: str


@dataclass(frozen=True, slots=True)
class Served:
    ad_ids: list[str]
    propensities: list[float]
    arm: str


class Service(Protocol):
    """What the simulation needs from a selection service."""

    def serve(self, user: SimUser, *, arm: str, k: int, request_id: str) -> Served: ...

    def click(self, *, request_id: str, ad_id: str, event_id: str) -> None: ...

    def records(self) -> list[dict[str, Any]]:
        """Every impression-log record so far, joined with the feedback (clicked filled)."""
        ...


def read_rows(path: Path, *, with_candidates: bool = True) -> list[dict[str, Any]]:
    """The impressions of a canonical file that have a history, a click and (unless `with_candidates` is
    False: a full-catalog file such as impressions_full_dev.jsonl) candidates."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("history") and rec.get("clicked") and (rec.get("candidates") or not with_candidates):
                rows.append(rec)
    return rows


def load_users(rows: Sequence[Mapping[str, Any]], *, n: int, seed: int, offset: int = 0) -> list[SimUser]:
    """`n` users in a seeded order, starting at `offset` (disjoint slices for fitting and for the simulation)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return [
        SimUser(f"sim-{offset + i}", r["user_id"], r["history"], r["candidates"], r["clicked"][0])
        for i, r in enumerate(rows[offset : offset + n])
    ]


def sampled_users(
    rows: Sequence[Mapping[str, Any]], *, catalog: Sequence[str], n: int, seed: int, offset: int = 0,
    first: Collection[str] = (), n_random: int = 19, candidate_seed: int = 0,
) -> list[SimUser]:
    """`n` distinct users of a full-catalog file (history + next purchase, no logged candidates), from `offset`
    in a seeded order that puts the users in `first` before the others (e.g. the users the fusion weights were
    not fitted on), each given the sampled protocol's 20-candidate list: the next purchase + `n_random` distinct
    catalog ads not in the history (eval.sample_logged.sampled_candidates), drawn by a generator seeded by
    (`candidate_seed`, the user id) so a user's list is the same in every run and every seed."""
    known = set(catalog)
    seen: set[str] = set()
    head: list[Mapping[str, Any]] = []
    tail: list[Mapping[str, Any]] = []
    for r in rows:
        if r["user_id"] in seen or not r.get("history") or not r.get("clicked") or r["clicked"][0] not in known:
            continue
        seen.add(r["user_id"])
        (head if r["user_id"] in first else tail).append(r)
    order = random.Random(seed)
    order.shuffle(head)
    order.shuffle(tail)
    out = []
    for i, r in enumerate((head + tail)[offset : offset + n]):
        rng = np.random.default_rng([candidate_seed, zlib.crc32(str(r["user_id"]).encode())])
        next_purchase = r["clicked"][0]
        candidates = sampled_candidates(clicked=[next_purchase], history=r["history"], catalog=catalog, n_random=n_random, rng=rng)
        out.append(SimUser(f"sim-{offset + i}", r["user_id"], r["history"], candidates, next_purchase))
    return out


# ---- the stand-in policies ------------------------------------------------------------------------


@dataclass
class BehaviourTables:
    """Popularity and co-visitation counted over the logged histories (never over the clicks)."""

    popularity: Counter
    covisit: dict[str, Counter]

    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], *, window: int = 3) -> "BehaviourTables":
        pop: Counter = Counter()
        co: dict[str, Counter] = defaultdict(Counter)
        for rec in rows:
            h = rec.get("history") or []
            pop.update(h)
            for i, a in enumerate(h):
                for b in h[i + 1 : i + 1 + window]:
                    co[a][b] += 1
                    co[b][a] += 1
        return cls(pop, dict(co))

    def features(self, user: SimUser) -> np.ndarray:
        """(candidates, 2): log popularity, recency-weighted co-visitation with the last 5 history items."""
        key = f"{user.user_id}|{user.next_purchase}"
        if key not in self._cache:
            self._cache[key] = self._features(user)
        return self._cache[key]

    def _features(self, user: SimUser) -> np.ndarray:
        recent = user.history[-5:][::-1]
        out = np.zeros((len(user.candidates), 2))
        for i, c in enumerate(user.candidates):
            out[i, 0] = math.log1p(self.popularity.get(c, 0))
            out[i, 1] = sum(0.8**d * self.covisit.get(h, {}).get(c, 0) for d, h in enumerate(recent))
        out[:, 1] = np.log1p(out[:, 1])
        return out


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


SCORERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "popularity": lambda f: _z(f[:, 0]),
    "covisit": lambda f: _z(f[:, 1]),
    "default": lambda f: 0.5 * _z(f[:, 0]) + _z(f[:, 1]),
}


@dataclass(frozen=True)
class Variant:
    name: str
    scorer: str  # a key of SCORERS
    exploration: ExplorationConfig = ExplorationConfig()


@dataclass
class DirectModel:
    """pCTR of an ad from the default scorer's score: Platt scaling fitted on users the OPE never sees."""

    a: float
    b: float

    def __call__(self, score: float) -> float:
        return 1.0 / (1.0 + math.exp(-(self.a * score + self.b)))

    @classmethod
    def fit(cls, users: Sequence[SimUser], tables: BehaviourTables) -> "DirectModel":
        x, y = [], []
        for u in users:
            x.extend(SCORERS["default"](tables.features(u)).tolist())
            y.extend(1.0 if c == u.next_purchase else 0.0 for c in u.candidates)
        X = np.column_stack([np.array(x), np.ones(len(x))])
        t = np.array(y)
        theta = np.zeros(2)
        for _ in range(50):  # Newton's method on the log loss (two parameters: no library needed)
            p = 1.0 / (1.0 + np.exp(-X @ theta))
            step = np.linalg.solve((X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2), X.T @ (p - t))
            theta -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(float(theta[0]), float(theta[1]))


class StandInService:
    """The simulation's service without HTTP: stand-in policies, the real log writer and feedback store."""

    def __init__(self, *, variants: Mapping[str, Variant], tables: BehaviourTables, direct: DirectModel, data_dir: Path):
        self.variants = dict(variants)
        self.tables = tables
        self.direct = direct
        self.log_dir = data_dir / "impressions"
        self.log = JsonlImpressionLog(self.log_dir, fsync="never", queue_size=1_000_000)
        self.feedback = FeedbackStore(data_dir / "feedback.sqlite", synchronous="NORMAL")

    def serve(self, user: SimUser, *, arm: str, k: int, request_id: str) -> Served:
        v = self.variants[arm]
        feats = self.tables.features(user)
        scores = SCORERS[v.scorer](feats)
        default = SCORERS["default"](feats)
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        ex = explore(order=order, scores=scores.tolist(), k=k, config=v.exploration, seed_key=f"{arm}:{request_id}")
        ids = [user.candidates[i] for i in ex.served]
        scored = [
            ScoredEntry(c, {"popularity": round(float(feats[i, 0]), 6), "covisit": round(float(feats[i, 1]), 6)},
                        score=round(float(scores[i]), 6), pctr=self.direct(float(default[i])))
            for i, c in enumerate(user.candidates)
        ]  # fmt: skip
        served = [
            ServedEntry(user.candidates[i], propensity=p, pctr=self.direct(float(default[i])), bid=1.0, score=float(scores[i]))
            for i, p in zip(ex.served, ex.propensities)
        ]
        self.log.write(
            build_record(
                request_id=request_id, user_key=user.user_id, now=datetime(2024, 1, 1), history=user.history,
                event_hashes=[], scored=scored, served=served, arm=arm, exploration=v.exploration.model_dump(),
                weights_version=v.scorer,
            )
        )  # fmt: skip
        self.feedback.record_served(request_id=request_id, user_key=user.user_id, ads=[ServedAdRow(a) for a in ids], arm=arm)
        return Served(ids, ex.propensities, arm)

    def click(self, *, request_id: str, ad_id: str, event_id: str) -> None:
        self.feedback.record(event_id=event_id, request_id=request_id, ad_id=ad_id, type="click")

    def records(self) -> list[dict[str, Any]]:
        self.log.flush()
        return list(self.feedback.join(iter_log_records(self.log_dir)))

    def close(self) -> None:
        self.log.close()
        self.feedback.close()


# ---- the simulation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    logging_arm: str = "default_explore"
    targets: tuple[str, ...] = ("popularity", "covisit", "default")
    k: int = 1
    decay: float = 1.0  # examination probability at position j is decay ** j
    seed: int = 0
    n_bootstrap: int = 1000
    clip: float | None = None
    alpha: float = 0.05  # the CIs are bootstrap (1 - alpha) percentile intervals


@dataclass
class SimResult:
    n_logged: int
    logging_ctr: float
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)  # target -> request id -> served on-policy

    def to_json(self) -> dict[str, Any]:
        return {"n_logged": self.n_logged, "logging_ctr": self.logging_ctr, "variants": self.variants}


def simulated_clicks(user: SimUser, served: Sequence[str], *, decay: float, rng: random.Random) -> list[str]:
    """The user clicks their next purchase if served and its position was examined (P = decay ** position)."""
    return [a for j, a in enumerate(served) if a == user.next_purchase and rng.random() < decay**j]


def run_simulation(service: Service, users: Sequence[SimUser], config: SimConfig) -> SimResult:
    """Log the users under the logging arm, serve each target on-policy, estimate each target from the log."""
    rng = random.Random(f"clicks:{config.seed}")
    by_request: dict[str, SimUser] = {}
    logged_clicks = 0
    for u in users:
        served = service.serve(u, arm=config.logging_arm, k=config.k, request_id=u.request_id)
        by_request[u.request_id] = u
        for a in simulated_clicks(u, served.ad_ids, decay=config.decay, rng=rng):
            service.click(request_id=u.request_id, ad_id=a, event_id=f"{u.request_id}:{a}:click")
            logged_clicks += 1
    on_policy: dict[str, float] = {}
    rankings: dict[str, dict[str, list[str]]] = {}
    for t in config.targets:
        clicks = 0
        rankings[t] = {}
        for u in users:
            rid = f"{u.request_id}:{t}"
            served = service.serve(u, arm=t, k=config.k, request_id=rid)
            rankings[t][u.request_id] = served.ad_ids
            for a in simulated_clicks(u, served.ad_ids, decay=config.decay, rng=rng):
                # reported like the logging arm's: an on-policy record without its clicks would read as
                # "served, not clicked" to anything that joins the log (the calibration refit does)
                service.click(request_id=rid, ad_id=a, event_id=f"{rid}:{a}:click")
                clicks += 1
        on_policy[t] = clicks / len(users)
    records = [r for r in service.records() if r.get("arm") == config.logging_arm]
    result = SimResult(n_logged=len(records), logging_ctr=logged_clicks / max(1, len(users)), rankings=rankings)
    for t in config.targets:
        data, skipped = logged_data_from_records(records, target=lambda rec, t=t: rankings[t][rec["request_id"]], k=config.k, direct=logged_pctr)
        res: OPEResult = estimate(data, clip=config.clip, n_bootstrap=config.n_bootstrap, alpha=config.alpha, seed=config.seed, skipped=skipped)
        result.variants[t] = {"on_policy_ctr": on_policy[t], **res.to_json()}
    return result


def stand_in_variants(*, temperature: float = 1.0, top_m: int = 20) -> dict[str, Variant]:
    """The logging arm (default + softmax exploration over every candidate) and the deterministic targets."""
    return {
        "default_explore": Variant("default_explore", "default", ExplorationConfig(method="softmax", temperature=temperature, top_m=top_m)),
        **{name: Variant(name, name) for name in SCORERS},
    }
