"""The fast systems for one impression: the default (the Selector's prior stage) and the baselines.

Logged protocol: one `Selector.prior_stage` call scores the shown candidates (put in tie-key order
first, eval.baselines.canonical_candidates); `default` is its order, and `dense`, `covisit`,
`popularity` re-rank the same candidates by that one prior feature (single columns of the same
feature matrix). Full-catalog protocol: `default` ranks the candidate set the pipeline generates; each
baseline returns its own top `n_retrieve` from the whole catalog, with the user's history excluded
exactly as the pipeline excludes it. Each system's ranker is the one its registry entry carries
(eval/systems.py → eval/baselines.py). Ties are broken by a seeded hash of the ad id, never by an order
a data file gives.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from selection.pipeline import PriorStage, Selector
from kernel.types import SelectRequest
from eval.baselines import FullView, LoggedView, Resources, canonical_candidates, impression_random, impression_rng, tie_key
from eval.bm25 import BM25Index
from eval.data import EvalImpression
from eval.systems import SYSTEMS

__all__ = ["FastRankers", "FastResult", "impression_random", "impression_rng"]


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
        rank_by: str = "expected_value",
    ):
        self.selector = selector
        self.index = selector.index
        sequence = selector.generator.sequence
        self.systems = [s for s in systems if (s != "bm25" or bm25 is not None) and (s != "sequence" or sequence is not None)]
        self.seed = seed
        self.res = Resources(
            index=selector.index, behaviour=selector.generator.behaviour, store=selector.generator.store, bm25=bm25,
            seed=seed, n_retrieve=n_retrieve, use_chroma=use_chroma and not selector.generator.searches_exactly(),
            recency_decay=selector.recency_decay, exclude_history=selector.exclude_history, sequence=sequence,
            pctr=selector.fusion.pctr, rank_by=rank_by,
        )  # fmt: skip
        self._keys = {a: int(k) for a, k in zip(self.index.ids, self.res.tiebreak.tolist())}

    def request(self, imp: EvalImpression) -> SelectRequest:
        # Logged: every shown candidate in the scored head (its prior features rank the baselines), in
        # tie-key order. Full catalog: the default head; the rest of the prior order comes back as `tail_ids`.
        k = len(imp.candidates) if imp.candidates is not None else 1
        return SelectRequest(
            user_id=imp.user_id,
            history=imp.history,
            candidates=self.canonical(imp.candidates),
            k=k,
            use_llm=False,
            rewrite=False,
            request_id=imp.impression_id,
        )

    def canonical(self, candidates: list[str] | None) -> list[str] | None:
        """Logged candidates in tie-key order (ids outside the catalog keyed like any other)."""
        if candidates is None:
            return None
        try:  # the common case: every candidate in the catalog, its key looked up in place (no per-call dict)
            return canonical_candidates(candidates, self._keys)
        except KeyError:
            keys = {a: self._keys[a] if a in self._keys else tie_key(self.seed, a) for a in candidates}
            return canonical_candidates(candidates, keys)

    @contextmanager
    def batch(self, items: Sequence[EvalImpression]) -> Iterator["FastRankers"]:
        """Within the block, `run` of these impressions reads the sequence model's state of every history
        from one batched forward pass (SequenceModel.primed: the same bits as one at a time)."""
        seq = self.selector.generator.sequence  # the prior stage reads it whatever the systems
        ctx = nullcontext() if seq is None else seq.primed(self.index.rows(imp.history)[0] for imp in items)
        with ctx:
            yield self

    def run(self, imp: EvalImpression) -> FastResult:
        stage = self.selector.prior_stage(self.request(imp))
        if imp.candidates is not None:
            return self._logged(imp, stage)
        return self._full(imp, stage)

    def _logged(self, imp: EvalImpression, stage: PriorStage) -> FastResult:
        cands = stage.candidates
        assert not stage.tail_ids, "logged candidates must all be in the scored head (k = len(candidates))"
        ids = [c.ad.ad_id for c in cands]
        rows = [self.index.row[i] for i in ids]
        view = LoggedView(imp=imp, stage=stage, ids=ids, rows=rows, tiebreak=self.res.tiebreak[rows])
        out = {name: SYSTEMS[name].logged(self.res, view) for name in self.systems}
        scores = clicked_at = None
        if "default" in out:
            # The fused scores the prior stage computed (with the LLM off, pCTR = fusion.pctr(score),
            # as Selector._finish attaches it); the report turns them into pCTR in one vectorised call.
            scores = [c.prior_score for c in cands]
            clicked_at = [k for k, i in enumerate(ids) if i in imp.clicked]
        return FastResult(out, None, scores=scores, clicked_at=clicked_at)

    def _full(self, imp: EvalImpression, stage: PriorStage) -> FastResult:
        hist_rows, _ = self.index.rows(imp.history)
        view = FullView(imp=imp, stage=stage, hist_rows=hist_rows, exclude=set(hist_rows) if self.res.exclude_history else set())
        out = {name: SYSTEMS[name].full(self.res, view) for name in self.systems}
        generated = {c.ad.ad_id for c in stage.candidates}.union(stage.tail_ids)
        return FastResult(
            out,
            pool_size=len(self.index.ids),
            candidate_set_size=len(generated),
            candidate_set_hit=bool(generated & imp.clicked),
        )
