"""The selection pipeline: the one core function the endpoint, the CLI and the eval harness all call.

    history/events ─▶ profile ─▶ candidates + prior features ─▶ fusion (prior score)
                  ─▶ [LLM rerank + justify + rewrite, within what is left of the deadline]
                  ─▶ fusion (prior + learned LLM term) ─▶ copy validator ─▶ Decision

The LLM stage is optional per request and globally; on any failure or timeout the prior ranking
and the original copy are served with `degraded=True` and the reason.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adselect.errors import LLMOutputInvalid, LLMUnavailable, UserError
from adselect.fusion import FusionModel
from adselect.types import Ad, Candidate, Copy, Decision, LLMResult, RankedAd, SelectRequest
from retrieval.candidates import CandidateGenerator
from retrieval.embedder import Embedder
from retrieval.features import FEATURES, build_profile
from retrieval.store import CatalogIndex

log = logging.getLogger(__name__)

CopyCheck = Callable[[Copy, Ad], list[str]]  # returns violation reasons; empty = ok


def original_copy(ad: Ad) -> Copy:
    return Copy(headline=ad.title, description=ad.text)


@dataclass
class PriorStage:
    candidates: list[Candidate]  # the head of the prior ranking (what the LLM and the response can use)
    tail_ids: list[str]  # the rest of the prior ranking, in order (eval ranks it; never re-scored)
    history_ads: list[Ad]
    unknown_ids: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Selector:
    index: CatalogIndex
    generator: CandidateGenerator
    fusion: FusionModel
    embedder: Embedder | None = None  # needed only for free-text events
    reranker: object | None = None  # agent.reranker.LLMReranker (or a fake with the same methods)
    copy_check: CopyCheck | None = None
    model_name: str | None = None
    prompt_info: dict[str, str] | None = None
    recency_decay: float = 0.8
    exclude_history: bool = True
    llm_max_candidates: int = 20
    llm_margin_ms: int = 30
    max_deadline_ms: int = 10000

    # ---- stage 1: priors -------------------------------------------------------------------
    def prior_stage(self, req: SelectRequest) -> PriorStage:
        t = time.perf_counter()
        timings: dict[str, float] = {}
        hist_rows, unknown = self.index.rows(req.history)
        event_vecs = None
        if req.events:
            if self.embedder is None:
                raise UserError("free-text events need an embedder; this selector was built without one")
            event_vecs = self.embedder.encode_cached(req.events)
        profile = build_profile(self.index, hist_rows, decay=self.recency_decay, event_vectors=event_vecs)
        timings["profile"] = _ms(t)

        t = time.perf_counter()
        if req.candidates is not None:
            cand_rows, cand_unknown = self.index.rows(dict.fromkeys(req.candidates))
            unknown += cand_unknown
            cset = self.generator.score_logged(profile, cand_rows)
        else:
            exclude = set(hist_rows) if self.exclude_history else set()
            cset = self.generator.generate(profile, exclude=exclude)
        timings["candidates"] = _ms(t)

        t = time.perf_counter()
        scores = self.fusion.prior_scores(cset.features)
        order = np.argsort(-scores, kind="stable")
        head = max(req.k, self.llm_max_candidates)
        cands: list[Candidate] = []
        for rank, i in enumerate(order[:head]):
            row = int(cset.rows[i])
            priors = {f: round(float(v), 6) for f, v in zip(FEATURES, cset.features[i].tolist())}
            cands.append(Candidate(ad=self.index.ads[row], priors=priors, prior_score=float(scores[i]), prior_rank=rank))
        tail = [self.index.ids[int(cset.rows[i])] for i in order[head:]]
        timings["fusion"] = _ms(t)
        history_ads = [self.index.ads[r] for r in hist_rows]
        return PriorStage(cands, tail, history_ads, list(dict.fromkeys(unknown)), timings)

    # ---- stage 2: LLM (sync and async share everything but the call) -----------------------
    def _llm_budget_s(self, req: SelectRequest, started: float) -> float:
        deadline_ms = min(req.deadline_ms, self.max_deadline_ms)
        return (deadline_ms - (time.perf_counter() - started) * 1000 - self.llm_margin_ms) / 1000

    def _wants_llm(self, req: SelectRequest, stage: PriorStage) -> str | None:
        """None if the LLM should be called, else why not ('' = not requested, not a degradation)."""
        if not req.use_llm:
            return ""
        if self.reranker is None:
            return "llm_disabled"
        if len(stage.candidates) < 2:
            return ""
        return None

    def select(self, req: SelectRequest) -> Decision:
        started = time.perf_counter()
        stage = self.prior_stage(req)
        llm_result, reason = None, self._wants_llm(req, stage)
        if reason is None:
            budget = self._llm_budget_s(req, started)
            t = time.perf_counter()
            if budget <= 0:
                reason = "deadline_exhausted"
            else:
                try:
                    llm_result = self.reranker.rerank(  # type: ignore[union-attr]
                        history_ads=stage.history_ads,
                        events=req.events,
                        candidates=stage.candidates[: self.llm_max_candidates],
                        timeout_s=budget,
                        rewrite=req.rewrite,
                    )
                except (LLMUnavailable, LLMOutputInvalid) as e:
                    reason = f"llm_{e.reason}"
            stage.timings_ms["llm"] = _ms(t)
        return self._finish(req, stage, llm_result, reason, started)

    async def aselect(self, req: SelectRequest) -> Decision:
        started = time.perf_counter()
        stage = self.prior_stage(req)
        llm_result, reason = None, self._wants_llm(req, stage)
        if reason is None:
            budget = self._llm_budget_s(req, started)
            t = time.perf_counter()
            if budget <= 0:
                reason = "deadline_exhausted"
            else:
                try:
                    llm_result = await asyncio.wait_for(
                        self.reranker.arerank(  # type: ignore[union-attr]
                            history_ads=stage.history_ads,
                            events=req.events,
                            candidates=stage.candidates[: self.llm_max_candidates],
                            timeout_s=budget,
                            rewrite=req.rewrite,
                        ),
                        timeout=budget,
                    )
                except TimeoutError:
                    reason = "llm_timeout"
                except (LLMUnavailable, LLMOutputInvalid) as e:
                    reason = f"llm_{e.reason}"
            stage.timings_ms["llm"] = _ms(t)
        return self._finish(req, stage, llm_result, reason, started)

    # ---- stage 3: fuse, validate copy, decide ----------------------------------------------
    def _finish(
        self, req: SelectRequest, stage: PriorStage, llm: LLMResult | None, reason: str | None, started: float
    ) -> Decision:
        t = time.perf_counter()
        cands = stage.candidates
        llm_rank: dict[str, int] = {a: i for i, a in enumerate(llm.ranking)} if llm else {}
        prior = np.array([c.prior_score for c in cands], dtype=np.float64)
        if llm is not None:
            scores = self.fusion.fused_scores(prior, [llm_rank.get(c.ad.ad_id) for c in cands])
        else:
            scores = prior
        order = np.argsort(-scores, kind="stable")
        top_pick = llm.ranking[0] if llm and llm.ranking else None
        ads: list[RankedAd] = []
        copy_rejections: list[str] = []
        for i in order[: req.k]:
            c = cands[int(i)]
            orig = original_copy(c.ad)
            served, justification = orig, None
            if llm is not None and c.ad.ad_id == top_pick:
                justification = llm.justification
                if req.rewrite and llm.copy is not None:
                    problems = self.copy_check(llm.copy, c.ad) if self.copy_check else []
                    if problems:
                        copy_rejections.extend(problems)
                    else:
                        served = llm.copy
            ads.append(
                RankedAd(
                    ad=c.ad,
                    score=round(float(scores[int(i)]), 6),
                    priors=c.priors,
                    llm_rank=llm_rank.get(c.ad.ad_id),
                    justification=justification,
                    copy=served,
                    original=orig,
                )
            )
        stage.timings_ms["finalize"] = _ms(t)
        stage.timings_ms["total"] = _ms(started)
        degraded = bool(reason)
        usage = {}
        if llm is not None:
            usage = {"prompt_tokens": llm.prompt_tokens or 0, "completion_tokens": llm.completion_tokens or 0}
        decision = Decision(
            request_id=req.request_id or uuid.uuid4().hex,
            ads=ads,
            llm_used=llm is not None,
            degraded=degraded,
            degraded_reason=reason or None,
            prompt=self.prompt_info if llm is not None or degraded else None,
            model=self.model_name if llm is not None else None,
            timings_ms={k: round(v, 3) for k, v in stage.timings_ms.items()},
            unknown_ids=stage.unknown_ids,
            ranking=[cands[int(i)].ad.ad_id for i in order] + stage.tail_ids,
            usage=usage,
            copy_rejections=copy_rejections,
        )
        return decision


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000
