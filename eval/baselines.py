"""How each fast system ranks one impression: one function per (system, protocol), carried by the registry.

A ranker reads a view of the impression (`LoggedView`: the shown candidates as the prior stage scored
them; `FullView`: the whole catalog) and the shared `Resources` (catalog index, behaviour, BM25, the tie
keys) and returns ad ids, best first.

Ties never follow an order found in a data file. Every ad has a tie key: a keyed hash of its id and the
task seed (`tie_keys`), so neither the logged display order nor the catalog file's row order can decide
an equal score. Logged candidates are put in tie-key order before the prior stage sees them
(`canonical_candidates`), so the pipeline's stable sort breaks its own ties the same way.
"""
from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.features import FEATURES, build_profile, covisit_scores
from retrieval.similarity import row_dots


def tie_key(seed: int, ad_id: str) -> int:
    """A seeded 64-bit hash of the ad id: the order of ads whose scores are equal."""
    h = hashlib.blake2b(ad_id.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def tie_keys(seed: int, ad_ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((tie_key(seed, a) for a in ad_ids), dtype=np.uint64, count=len(ad_ids))


def canonical_candidates(candidates: Sequence[str], keys: dict[str, int]) -> list[str]:
    """The logged candidates in tie-key order (their display order says nothing)."""
    return sorted(candidates, key=keys.__getitem__)


def impression_rng(seed: int, impression_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(impression_id.encode())])


def impression_random(seed: int, impression_id: str) -> random.Random:
    """A cheap per-impression stream (stdlib), for the random baseline's shuffle."""
    return random.Random((seed << 32) | zlib.crc32(impression_id.encode()))


def order_by(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in `tiebreak` order."""
    return np.lexsort((tiebreak, -scores))


@dataclass
class Resources:
    """What the rankers share across impressions (built once per run by eval.rankers.FastRankers)."""

    index: Any  # retrieval.store.CatalogIndex
    behaviour: Any  # retrieval.behaviour.BehaviourStats
    store: Any | None  # Chroma store (full catalog, dense)
    bm25: Any | None  # eval.bm25.BM25Index
    seed: int
    n_retrieve: int
    use_chroma: bool  # dense baseline from Chroma's HNSW; False when the generator searches exactly (its rule)
    recency_decay: float
    exclude_history: bool
    sequence: Any | None = None  # retrieval.sequence.SequenceModel (the generator's), None: no `sequence` system
    pctr: Any | None = None  # the fusion's score -> pCTR (selection.fusion.FusionModel.pctr): the `served` system
    rank_by: str = "expected_value"  # the service's serving order (settings.rank_by): the `served` system
    tiebreak: np.ndarray = field(init=False)  # tie key per catalog row
    popular_order: np.ndarray = field(init=False)  # whole catalog, most popular first
    canonical_rows: np.ndarray = field(init=False)  # catalog rows in tie-key order (not file order)

    def __post_init__(self) -> None:
        self.tiebreak = tie_keys(self.seed, self.index.ids)
        self.popular_order = order_by(self.behaviour.popularity.astype(np.float64), self.tiebreak)
        self.canonical_rows = np.argsort(self.tiebreak, kind="stable")

    def top(self, scores: np.ndarray, exclude: set[int], n: int, *, positive: bool = False) -> list[int]:
        """The n best rows by score (ties by tie key, also at the cut), `exclude` left out."""
        s = scores.astype(np.float64, copy=True)
        if exclude:
            s[list(exclude)] = -np.inf
        k = min(n, len(s))
        if k == 0:
            return []
        kth = s[np.argpartition(-s, k - 1)[k - 1]]
        pool = np.flatnonzero(s >= kth)  # every row tied with the k-th is a contender
        top = pool[order_by(s[pool], self.tiebreak[pool])][:k]
        keep = s[top] > 0 if positive else np.isfinite(s[top])
        return top[keep].tolist()


@dataclass
class LoggedView:
    imp: Any  # eval.data.EvalImpression
    stage: Any  # selection.pipeline.PriorStage
    ids: list[str]  # the candidates in the prior stage's order
    rows: list[int]
    tiebreak: np.ndarray  # tie key per candidate


@dataclass
class FullView:
    imp: Any
    stage: Any
    hist_rows: list[int]
    exclude: set[int]
    _profile: Any = None

    def profile(self, r: Resources):
        if self._profile is None:
            self._profile = build_profile(r.index, self.hist_rows, decay=r.recency_decay)
        return self._profile


# ---- rank what was shown -------------------------------------------------------------------------
def default_logged(r: Resources, v: LoggedView) -> list[str]:
    return list(v.ids)


def random_logged(r: Resources, v: LoggedView) -> list[str]:
    shuffled = [v.ids[i] for i in np.argsort(v.tiebreak, kind="stable")]  # start from an order no file gave
    impression_random(r.seed, v.imp.impression_id).shuffle(shuffled)
    return shuffled


def prior_feature_logged(feature: str):
    """Rank the shown candidates by one prior feature the stage computed (dense, covisit, popularity)."""

    column = FEATURES.index(feature)

    def rank(r: Resources, v: LoggedView) -> list[str]:
        cands, priors = v.stage.candidates, v.stage.head_priors
        if priors is not None and len(priors) == len(cands):  # the same values as the candidates' dicts, one column
            s = priors[:, column]
        else:
            s = np.fromiter((c.priors[feature] for c in cands), dtype=np.float64, count=len(cands))
        return [v.ids[i] for i in order_by(s, v.tiebreak)]

    rank.__name__ = f"{feature}_logged"
    return rank


def _served(r: Resources, cands) -> list[int]:
    """The head of the prior stage in the order the endpoint serves it (selection.pipeline.serving_order)."""
    from selection.pipeline import serving_order

    scores = np.fromiter((c.prior_score for c in cands), dtype=np.float64, count=len(cands))
    bids = np.fromiter((c.ad.bid for c in cands), dtype=np.float64, count=len(cands))
    return serving_order(scores, pctr=r.pctr(scores), bids=bids, rank_by=r.rank_by).tolist()  # type: ignore[arg-type, misc]


def served_logged(r: Resources, v: LoggedView) -> list[str]:
    return [v.ids[i] for i in _served(r, v.stage.candidates)]


def bm25_logged(r: Resources, v: LoggedView) -> list[str]:
    hist_rows, _ = r.index.rows(v.imp.history)
    s = r.bm25.score_rows(r.bm25.query_vector(hist_rows), v.rows)
    return [v.ids[i] for i in order_by(s, v.tiebreak)]


# ---- retrieve from the whole catalog, then rank --------------------------------------------------
def default_full(r: Resources, v: FullView) -> list[str]:
    return [c.ad.ad_id for c in v.stage.candidates] + v.stage.tail_ids


def served_full(r: Resources, v: FullView) -> list[str]:
    """The served head (the endpoint serves only from it), then the rest in prior order."""
    cands = v.stage.candidates
    return [cands[i].ad.ad_id for i in _served(r, cands)] + v.stage.tail_ids


def random_full(r: Resources, v: FullView) -> list[str]:
    ids, n = r.index.ids, r.n_retrieve
    draw = impression_rng(r.seed, v.imp.impression_id).choice(len(ids), size=min(len(ids), n + len(v.exclude)), replace=False)
    rows = (int(r.canonical_rows[d]) for d in draw)
    return [ids[x] for x in rows if x not in v.exclude][:n]


def popularity_full(r: Resources, v: FullView) -> list[str]:
    rows: list[int] = []
    for x in r.popular_order:
        if len(rows) >= r.n_retrieve:
            break
        if int(x) not in v.exclude:
            rows.append(int(x))
    return [r.index.ids[x] for x in rows]


def dense_full(r: Resources, v: FullView) -> list[str]:
    """The n nearest ads to the profile: exact (ties by tie key) whenever the pipeline's dense source
    searches exactly (CandidateGenerator.searches_exactly), else Chroma's approximate HNSW."""
    vector = v.profile(r).vector
    if vector is None:
        return []
    n, ids = r.n_retrieve, r.index.ids
    if r.use_chroma and r.store is not None:
        hits = r.store.nearest(vector, min(n + len(v.exclude), len(r.index)))
        rows = [r.index.row[i] for i, _ in hits if i in r.index.row]
        return [ids[x] for x in rows if x not in v.exclude][:n]
    return [ids[x] for x in r.top(row_dots(r.index.vectors, vector), v.exclude, n)]


def covisit_full(r: Resources, v: FullView) -> list[str]:
    sc = covisit_scores(r.behaviour, v.profile(r))
    return [r.index.ids[x] for x in r.top(sc, v.exclude, r.n_retrieve, positive=True)]


def sequence_full(r: Resources, v: FullView) -> list[str]:
    """The sequence model's top next items after the history (the `sequence` source, ties by tie key)."""
    if r.sequence is None or not v.hist_rows:
        return []
    return [r.index.ids[x] for x in r.top(r.sequence.scores(v.hist_rows), v.exclude, r.n_retrieve)]


def bm25_full(r: Resources, v: FullView) -> list[str]:
    sc = r.bm25.score_all(r.bm25.query_vector(v.hist_rows))
    return [r.index.ids[x] for x in r.top(sc, v.exclude, r.n_retrieve, positive=True)]
