"""The fast systems for one impression: the default (the Selector's prior stage) and the baselines.

Logged protocol: one `Selector.prior_stage` call scores the shown candidates; `default` is its order,
and `dense`, `covisit`, `popularity` re-rank the same candidates by that one prior feature (they are
single columns of the same feature matrix). Full-catalog protocol: `default` ranks the candidate set
the pipeline generates; each baseline returns its own top `n_retrieve` from the whole catalog, with
the user's history excluded exactly as the pipeline excludes it. Ties are broken by a random order
seeded once per catalog row (a fixed random order of the ads), so the logged display order never
leaks into a ranking; the random baseline shuffles with a stream seeded by (seed, impression id).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

import numpy as np

from selection.pipeline import PriorStage, Selector
from kernel.types import SelectRequest
from eval.bm25 import BM25Index
from eval.data import EvalImpression
from retrieval.features import build_profile, covisit_scores

_FEATURE_OF = {"dense": "dense", "covisit": "covisit", "popularity": "popularity"}


def impression_rng(seed: int, impression_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(impression_id.encode())])


def impression_random(seed: int, impression_id: str) -> random.Random:
    """A cheap per-impression stream (stdlib), for the random baseline's shuffle."""
    return random.Random((seed << 32) | zlib.crc32(impression_id.encode()))


def order_by(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in `tiebreak` order."""
    return np.lexsort((tiebreak, -scores))


@dataclass
class FastResult:
    rankings: dict[str, list[str]]
    pool_size: int | None  # None = the ranked list itself (logged); catalog size for full catalog
    candidate_set_size: int | None = None  # full catalog: the generated candidate set
    candidate_set_hit: bool | None = None  # full catalog: any clicked id in the candidate set
    timings_ms: dict[str, float] = field(default_factory=dict)
    scores: list[float] | None = None  # logged + default: each candidate's fused score, in `default` order
    clicked_at: list[int] | None = None  # positions in `scores` of the clicked candidates


class FastRankers:
    def __init__(
        self,
        *,
        selector: Selector,
        bm25: BM25Index | None,
        systems: list[str],
        n_retrieve: int = 100,
        use_chroma: bool = True,
        seed: int = 0,
    ):
        self.selector = selector
        self.index = selector.index
        self.behaviour = selector.generator.behaviour
        self.store = selector.generator.store
        self.bm25 = bm25
        self.systems = systems
        self.n_retrieve = n_retrieve
        self.use_chroma = use_chroma
        self.seed = seed
        pop = self.behaviour.popularity
        self._tiebreak = np.random.default_rng(seed).random(len(pop))  # per catalog row
        self._popular_order = order_by(pop.astype(np.float64), self._tiebreak)  # whole catalog, most popular first

    def request(self, imp: EvalImpression) -> SelectRequest:
        # Logged: every shown candidate in the scored head (its prior features rank the baselines).
        # Full catalog: the default head; the rest of the prior order comes back as `tail_ids`.
        k = len(imp.candidates) if imp.candidates is not None else 1
        return SelectRequest(
            user_id=imp.user_id,
            history=imp.history,
            candidates=imp.candidates,
            k=k,
            use_llm=False,
            rewrite=False,
            request_id=imp.impression_id,
        )

    def run(self, imp: EvalImpression) -> FastResult:
        stage = self.selector.prior_stage(self.request(imp))
        if imp.candidates is not None:
            return self._logged(imp, stage)
        return self._full(imp, stage)

    # ---- rank what was shown -----------------------------------------------------------------
    def _logged(self, imp: EvalImpression, stage: PriorStage) -> FastResult:
        cands = stage.candidates
        assert not stage.tail_ids, "logged candidates must all be in the scored head (k = len(candidates))"
        ids = [c.ad.ad_id for c in cands]
        rows = [self.index.row[i] for i in ids]
        tb = self._tiebreak[rows]
        out: dict[str, list[str]] = {}
        scores = clicked_at = None
        for name in self.systems:
            if name == "default":
                out[name] = ids
                # The fused scores the prior stage computed (with the LLM off, pCTR = fusion.pctr(score),
                # as Selector._finish attaches it); the report turns them into pCTR in one vectorised call.
                scores = [c.prior_score for c in cands]
                clicked_at = [k for k, i in enumerate(ids) if i in imp.clicked]
            elif name == "random":
                shuffled = list(ids)
                impression_random(self.seed, imp.impression_id).shuffle(shuffled)
                out[name] = shuffled
            elif name in _FEATURE_OF:
                f = _FEATURE_OF[name]
                s = np.fromiter((c.priors[f] for c in cands), dtype=np.float64, count=len(cands))
                out[name] = [ids[i] for i in order_by(s, tb)]
            elif name == "bm25" and self.bm25 is not None:
                hist_rows, _ = self.index.rows(imp.history)
                q = self.bm25.query_vector(hist_rows)
                s = self.bm25.score_rows(q, rows)
                out[name] = [ids[i] for i in order_by(s, tb)]
        return FastResult(out, None, scores=scores, clicked_at=clicked_at)

    # ---- retrieve from the whole catalog, then rank --------------------------------------------
    def _top(self, scores: np.ndarray, exclude: set[int], n: int, *, positive: bool = False) -> list[int]:
        s = scores.astype(np.float64, copy=True)
        if exclude:
            s[list(exclude)] = -np.inf
        k = min(n, len(s))
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        keep = s[top] > 0 if positive else np.isfinite(s[top])
        return top[keep].tolist()

    def _full(self, imp: EvalImpression, stage: PriorStage) -> FastResult:
        n = self.n_retrieve
        ids = self.index.ids
        hist_rows, _ = self.index.rows(imp.history)
        exclude = set(hist_rows) if self.selector.exclude_history else set()
        profile = None
        out: dict[str, list[str]] = {}
        for name in self.systems:
            if name == "default":
                out[name] = [c.ad.ad_id for c in stage.candidates] + stage.tail_ids
            elif name == "random":
                rng = impression_rng(self.seed, imp.impression_id)
                draw = rng.choice(len(ids), size=min(len(ids), n + len(exclude)), replace=False)
                out[name] = [ids[r] for r in draw if r not in exclude][:n]
            elif name == "popularity":
                rows = []
                for r in self._popular_order:
                    if len(rows) >= n:
                        break
                    if int(r) not in exclude:
                        rows.append(int(r))
                out[name] = [ids[r] for r in rows]
            elif name == "dense":
                profile = profile or build_profile(self.index, hist_rows, decay=self.selector.recency_decay)
                out[name] = self._dense(profile.vector, exclude, n)
            elif name == "covisit":
                profile = profile or build_profile(self.index, hist_rows, decay=self.selector.recency_decay)
                sc = covisit_scores(self.behaviour, profile)
                out[name] = [ids[r] for r in self._top(sc, exclude, n, positive=True)]
            elif name == "bm25" and self.bm25 is not None:
                sc = self.bm25.score_all(self.bm25.query_vector(hist_rows))
                out[name] = [ids[r] for r in self._top(sc, exclude, n, positive=True)]
        generated = {c.ad.ad_id for c in stage.candidates}.union(stage.tail_ids)
        return FastResult(
            out,
            pool_size=len(ids),
            candidate_set_size=len(generated),
            candidate_set_hit=bool(generated & imp.clicked),
        )

    def _dense(self, vector: np.ndarray | None, exclude: set[int], n: int) -> list[str]:
        if vector is None:
            return []
        if self.use_chroma and self.store is not None:
            hits = self.store.nearest(vector, min(n + len(exclude), len(self.index)))
            rows = [self.index.row[i] for i, _ in hits if i in self.index.row]
            return [self.index.ids[r] for r in rows if r not in exclude][:n]
        sims = self.index.vectors @ vector
        return [self.index.ids[r] for r in self._top(sims, exclude, n)]
