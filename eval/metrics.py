"""Ranking metrics for one logged impression (the per-impression numbers of every eval run).

A metric reads a system's `ranking` (candidate ids, best first) and the impression's `clicked` ids
(binary relevance). Conventions, shared by every metric:

- Clicked ids missing from the ranking count as ranked last, below everything: they take the
  bottom positions of the pool. The pool is the ranked ids plus the missing clicked ids, unless
  `pool_size` says it is larger (full-catalog retrieval returns a top-K list of a larger catalog:
  pass the catalog size so a short list earns no credit at cut-offs beyond its length). Unranked,
  non-clicked pool items sit between the ranking and the missing clicked ids.
- A metric returns None when it is undefined for the impression: every metric when nothing was
  clicked, and AUC also when everything in the pool was clicked. Aggregation skips None.
- A ranking is a strict order, so AUC never sees ties inside it (ties would count half).

Per-impression work is plain Python over the clicked positions (a few microseconds). Means and
intervals over impressions come from eval.bootstrap (`mean_with_ci`, `paired_diff`, re-exported here).

Revenue (`revenue@k`, only when the catalog gives bids): the sum of the bids of the clicked ads in the
top k, what the slate earned if each click pays its ad's bid (cost per click). It reads ids, not
positions, so it is computed beside the relevance metrics, not through `Positions`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import partial

from kernel.errors import UnknownName
from eval.bootstrap import mean_with_ci, paired_diff

__all__ = [
    "METRIC_NAMES",
    "Metric",
    "Positions",
    "auc",
    "get_metric",
    "hit_at",
    "impression_metrics",
    "locate",
    "mean_with_ci",
    "metrics_by_protocol",
    "mrr",
    "ndcg_at",
    "paired_diff",
    "recall_at",
    "REVENUE_KS",
    "revenue_at",
    "revenue_names",
]


@dataclass(frozen=True, slots=True)
class Positions:
    """Where the clicked ids sit: 1-based positions, ascending, in a pool of `pool` items."""

    ranks: tuple[int, ...]
    pool: int


def locate(ranking: Sequence[str], clicked: AbstractSet[str], *, pool_size: int | None = None) -> Positions:
    """Positions of the clicked ids in `ranking`; missing clicked ids take the bottom of the pool."""
    n = len(ranking)
    if len(set(ranking)) != n:
        raise ValueError("ranking repeats an id")
    ranks = [i for i, ad_id in enumerate(ranking, start=1) if ad_id in clicked]
    missing = len(clicked) - len(ranks)
    pool = n + missing if pool_size is None else pool_size
    if pool < n + missing:
        raise ValueError(f"pool_size {pool} is smaller than the ranking plus missing clicked ids ({n + missing})")
    ranks.extend(range(pool - missing + 1, pool + 1))
    return Positions(tuple(ranks), pool)


_DISCOUNTS: list[float] = [0.0]  # _DISCOUNTS[r] = 1 / log2(r + 1) for a 1-based rank r
_IDEAL: list[float] = [0.0]  # _IDEAL[m] = sum of the first m discounts (IDCG with m relevant items)


def _discount(r: int) -> float:
    while len(_DISCOUNTS) <= r:
        d = 1.0 / math.log2(len(_DISCOUNTS) + 1)
        _DISCOUNTS.append(d)
        _IDEAL.append(_IDEAL[-1] + d)
    return _DISCOUNTS[r]


def _ideal(m: int) -> float:
    _discount(m)
    return _IDEAL[m]


def _auc(p: Positions) -> float | None:
    m = len(p.ranks)
    negatives = p.pool - m
    if m == 0 or negatives == 0:
        return None
    # The j-th clicked id (0-based, by position) has pool - rank items below it, m - 1 - j of them clicked.
    correct = sum(p.pool - r - (m - 1 - j) for j, r in enumerate(p.ranks))
    return correct / (m * negatives)


def _mrr(p: Positions) -> float | None:
    return 1.0 / p.ranks[0] if p.ranks else None


def _ndcg(p: Positions, *, k: int) -> float | None:
    if not p.ranks:
        return None
    dcg = sum(_discount(r) for r in p.ranks if r <= k)
    return dcg / _ideal(min(k, len(p.ranks)))


def _hit(p: Positions, *, k: int) -> float | None:
    if not p.ranks:
        return None
    return 1.0 if p.ranks[0] <= k else 0.0


def _recall(p: Positions, *, k: int) -> float | None:
    if not p.ranks:
        return None
    return sum(1 for r in p.ranks if r <= k) / len(p.ranks)


@dataclass(frozen=True, slots=True)
class Metric:
    """A named metric: call it on (ranking, clicked), or on precomputed Positions via `of`."""

    name: str
    of: Callable[[Positions], float | None]

    def __call__(
        self, ranking: Sequence[str], clicked: AbstractSet[str], *, pool_size: int | None = None
    ) -> float | None:
        return self.of(locate(ranking, clicked, pool_size=pool_size))


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def ndcg_at(k: int) -> Metric:
    """nDCG@k: binary gains, 1/log2(rank+1) discount, IDCG over min(k, n_clicked) clicks."""
    _check_k(k)
    return Metric(f"ndcg@{k}", partial(_ndcg, k=k))


def hit_at(k: int) -> Metric:
    """1 if any clicked id is in the top k, else 0."""
    _check_k(k)
    return Metric(f"hit@{k}", partial(_hit, k=k))


def recall_at(k: int) -> Metric:
    """Clicked ids in the top k over all clicked ids."""
    _check_k(k)
    return Metric(f"recall@{k}", partial(_recall, k=k))


auc = Metric("auc", _auc)
"""Fraction of (clicked, non-clicked) pairs with the clicked id ranked higher."""
mrr = Metric("mrr", _mrr)
"""1 / rank of the first clicked id."""

_REGISTRY: dict[str, Metric] = {
    m.name: m
    for m in [
        auc,
        mrr,
        *(ndcg_at(k) for k in (1, 5, 10, 20)),
        *(hit_at(k) for k in (1, 5, 10)),
        *(recall_at(k) for k in (20, 50, 100)),
    ]
}
METRIC_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownName("metric", name, list(METRIC_NAMES)) from None


def impression_metrics(
    ranking: Sequence[str],
    clicked: AbstractSet[str],
    *,
    names: Sequence[str],
    pool_size: int | None = None,
) -> dict[str, float | None]:
    """The named metrics for one impression (positions computed once for all of them)."""
    metrics = [get_metric(n) for n in names]
    p = locate(ranking, clicked, pool_size=pool_size)
    return {m.name: m.of(p) for m in metrics}


REVENUE_KS: tuple[int, ...] = (1, 3, 5)  # 3: the endpoint's default slate (SelectRequest.k)


def revenue_names(ks: Sequence[int] = REVENUE_KS) -> list[str]:
    return [f"revenue@{k}" for k in ks]


def revenue_at(ranking: Sequence[str], clicked: AbstractSet[str], bids: Mapping[str, float], *, k: int) -> float:
    """Σ bid of the clicked ids in the top k (a clicked id without a bid earns 0)."""
    _check_k(k)
    return float(sum(bids.get(a, 0.0) for a in ranking[:k] if a in clicked))


_SEEN_MAX = 100_000  # distinct Positions kept by one metrics_by_protocol (full catalog: positions spread wider)


def metrics_by_protocol(
    names_logged: Sequence[str],
    names_full: Sequence[str],
    *,
    bids: Mapping[str, float] | None = None,
    revenue_ks: Sequence[int] = REVENUE_KS,
):
    """`of(imp, rankings, pool_size)`: every system's named metrics for one impression.

    Logged impressions get `names_logged`, full-catalog ones `names_full` (recall@K only applies there);
    positions are located once per ranking. The harness and the LLM phase both score rankings with it.
    `bids` (ad id -> bid) given: also `revenue@k` for k in `revenue_ks` (None: the catalog has no bids).
    """
    logged = [get_metric(n) for n in names_logged]
    full_metrics = [get_metric(n) for n in names_full]
    for k in revenue_ks:
        _check_k(k)

    # A metric depends on the positions only: their values are computed once per distinct Positions
    # (logged impressions: a few hundred distinct ones over a run) and copied from there.
    seen: dict[tuple[bool, Positions], dict[str, float | None]] = {}

    def of(imp, rankings: dict[str, list[str]], pool_size: int | None) -> dict[str, dict[str, float | None]]:
        full = imp.candidates is None
        metrics = full_metrics if full else logged
        out = {}
        for s, r in rankings.items():
            p = locate(r, imp.clicked, pool_size=pool_size)
            values = seen.get((full, p))
            if values is None:
                values = {m.name: m.of(p) for m in metrics}
                if len(seen) < _SEEN_MAX:
                    seen[(full, p)] = values
            out[s] = dict(values)
            if bids is not None and imp.clicked:
                for k in revenue_ks:
                    out[s][f"revenue@{k}"] = revenue_at(r, imp.clicked, bids, k=k)
        return out

    return of
