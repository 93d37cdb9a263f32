"""The selection pipeline: the one core function the endpoint, the CLI and the eval harness all call.

    history/events ─▶ profile ─▶ candidates (eligible only) + prior features ─▶ fusion (prior score)
                  ─▶ [breaker ∧ free LLM slot ∧ time left ⇒ LLM rerank + justify + rewrite]
                  ─▶ fusion (prior + learned LLM term) ─▶ order (bid × pCTR or relevance)
                  ─▶ eligibility re-check + frequency-cap reservation ─▶ copy validator ─▶ Decision

The LLM stage is optional per request and globally; on any failure, timeout, open breaker or busy
LLM the prior ranking and the original copy are served with `degraded=True` and the reason. Model
text never changes a rule, a cap or an id: the LLM only contributes a ranking over the ids it was
sent (validated), one justification, and copy that must pass the deterministic validator.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from kernel.errors import LLMOutputInvalid, LLMUnavailable, UserError
from kernel.reasons import AVAILABILITY_FAILURES, DegradedReason, degradation_for
from selection.fusion import FusionModel
from selection.rules import EligibilityPolicy, chroma_where, is_eligible
from kernel.types import Ad, Candidate, Copy, Decision, LLMResult, RankedAd, RequestContext, SelectRequest
from retrieval.candidates import CandidateGenerator, CandidateSet
from retrieval.embedder import Embedder
from retrieval.features import FEATURES, build_profile
from retrieval.store import CatalogIndex

log = logging.getLogger(__name__)

CopyCheck = Callable[[Copy, Ad], list[str]]  # returns violation reasons; empty = ok
TextCheck = Callable[[str, Ad], list[str]]
AuditSink = Callable[[dict], None]


def original_copy(ad: Ad) -> Copy:
    return Copy(headline=ad.title, description=ad.text)


@dataclass
class PriorStage:
    candidates: list[Candidate]  # the head of the prior ranking (what the LLM and the response can use)
    tail_ids: list[str]  # the rest of the prior ranking, in order (eval ranks it; never re-scored)
    history_ads: list[Ad]
    unknown_ids: list[str]
    ineligible: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Selector:
    index: CatalogIndex
    generator: CandidateGenerator
    fusion: FusionModel
    embedder: Embedder | None = None  # needed only for free-text events
    reranker: object | None = None  # agent.reranker.LLMReranker (or a fake with the same methods)
    copy_check: CopyCheck | None = None
    text_check: TextCheck | None = None  # model free text shown with an ad (the justification); reasons, empty = ok
    policy: EligibilityPolicy | None = None  # None: every ad is eligible (offline replay)
    caps: object | None = None  # selection.caps.CapStore; None: no frequency caps (offline replay)
    user_key: Callable[[str], str] = lambda u: u  # keyed hash for caps and logs
    breaker: object | None = None  # agent.breaker.CircuitBreaker
    limiter: object | None = None  # agent.breaker.ConcurrencyLimiter
    audit: AuditSink | None = None
    model_name: str | None = None
    prompt_info: dict[str, str] | None = None
    rank_by: Literal["expected_value", "relevance"] = "relevance"
    recency_decay: float = 0.8
    exclude_history: bool = True
    llm_max_candidates: int = 20
    llm_margin_ms: int = 30
    max_deadline_ms: int = 10000

    # ---- stage 1: priors -------------------------------------------------------------------
    def _context(self, req: SelectRequest) -> RequestContext:
        return req.context if req.context is not None else RequestContext(now=datetime.now(timezone.utc).replace(tzinfo=None))

    def _eligible(self, cset: CandidateSet, ctx: RequestContext, ineligible: dict[str, str]) -> CandidateSet:
        if self.policy is None:
            return cset
        keep = np.ones(len(cset.rows), dtype=bool)
        for i, row in enumerate(cset.rows.tolist()):
            ok, reason = is_eligible(self.index.ads[row], ctx, self.policy)
            if not ok:
                keep[i] = False
                ineligible[self.index.ids[row]] = reason or "ineligible"
        if keep.all():
            return cset
        return CandidateSet(cset.rows[keep], cset.features[keep], cset.sources)

    def prior_stage(self, req: SelectRequest) -> PriorStage:
        t = time.perf_counter()
        timings: dict[str, float] = {}
        ctx = self._context(req)
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
            where = chroma_where(ctx, self.policy) if self.policy is not None else None
            cset = self.generator.generate(profile, exclude=exclude, where=where)
        ineligible: dict[str, str] = {}
        cset = self._eligible(cset, ctx, ineligible)
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
        return PriorStage(cands, tail, history_ads, list(dict.fromkeys(unknown)), ineligible, timings)

    # ---- stage 2: LLM (sync and async share everything but the call) -----------------------
    def _llm_budget_s(self, req: SelectRequest, started: float) -> float:
        deadline_ms = min(req.deadline_ms, self.max_deadline_ms)
        return (deadline_ms - (time.perf_counter() - started) * 1000 - self.llm_margin_ms) / 1000

    def _admit_llm(self, req: SelectRequest, stage: PriorStage, started: float) -> tuple[str | None, float]:
        """(None, budget) if the LLM may be called now (a limiter slot is then held), else (reason, 0).

        Reason '' means the LLM was not requested: not a degradation."""
        if not req.use_llm or len(stage.candidates) < 2:
            return "", 0.0
        if self.reranker is None:
            return DegradedReason.LLM_DISABLED, 0.0
        budget = self._llm_budget_s(req, started)
        if budget <= 0:
            return DegradedReason.DEADLINE_EXHAUSTED, 0.0
        if self.limiter is not None and not self.limiter.try_acquire():
            return DegradedReason.LLM_BUSY, 0.0
        if self.breaker is not None and not self.breaker.allow():
            if self.limiter is not None:
                self.limiter.release()
            return DegradedReason.LLM_BREAKER_OPEN, 0.0
        return None, budget

    def _llm_done(self, error: Exception | None) -> str | None:
        """Release the slot, tell the breaker, name the degradation."""
        if self.limiter is not None:
            self.limiter.release()
        reason = degradation_for(error) if error is not None else None
        if self.breaker is not None:
            # Invalid output is the model's quality, not its availability: it does not open the breaker.
            if reason in AVAILABILITY_FAILURES:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
        return reason

    def _llm_args(self, req: SelectRequest, stage: PriorStage, budget: float) -> dict:
        sent = stage.candidates[: self.llm_max_candidates]
        # The justification and copy are written for the ad the service expects to serve: the first of the
        # final order computed without the LLM (the LLM's ranking moves it only through its learned weight).
        prior = np.array([c.prior_score for c in sent], dtype=np.float64)
        target = sent[int(self._order(prior, sent)[0])].ad.ad_id
        return dict(
            history_ads=stage.history_ads,
            events=req.events,
            candidates=sent,
            timeout_s=budget,
            rewrite=req.rewrite,
            target_id=target,
        )

    def _order(self, scores: np.ndarray, cands: list[Candidate]) -> np.ndarray:
        """Serving order: bid × pCTR (ties by relevance), or relevance alone."""
        if self.rank_by == "expected_value":
            ev = self.fusion.pctr(scores) * np.array([c.ad.bid for c in cands], dtype=np.float64)
            return np.lexsort((-scores, -ev))
        return np.argsort(-scores, kind="stable")

    def select(self, req: SelectRequest) -> Decision:
        started = time.perf_counter()
        stage = self.prior_stage(req)
        llm_result = None
        reason, budget = self._admit_llm(req, stage, started)
        if reason is None:
            t = time.perf_counter()
            err: Exception | None = None
            try:
                llm_result = self.reranker.rerank(**self._llm_args(req, stage, budget))  # type: ignore[union-attr]
            except (LLMUnavailable, LLMOutputInvalid) as e:
                err = e
            reason = self._llm_done(err)
            stage.timings_ms["llm"] = _ms(t)
        return self._finish(req, stage, llm_result, reason, started)

    async def aselect(self, req: SelectRequest) -> Decision:
        """As `select`, with the LLM call awaited; the CPU-bound stages run on a worker thread so the
        event loop stays free to answer (and shed) other requests meanwhile."""
        started = time.perf_counter()
        stage = await asyncio.to_thread(self.prior_stage, req)
        llm_result = None
        reason, budget = self._admit_llm(req, stage, started)
        if reason is None:
            t = time.perf_counter()
            err: Exception | None = None
            try:
                llm_result = await asyncio.wait_for(
                    self.reranker.arerank(**self._llm_args(req, stage, budget)),  # type: ignore[union-attr]
                    timeout=budget,
                )
            except (LLMUnavailable, LLMOutputInvalid, TimeoutError) as e:
                err = e
            reason = self._llm_done(err)
            stage.timings_ms["llm"] = _ms(t)
        return await asyncio.to_thread(self._finish, req, stage, llm_result, reason, started)

    # ---- stage 3: fuse, order, re-check rules, reserve caps, validate copy -----------------
    def _finish(
        self, req: SelectRequest, stage: PriorStage, llm: LLMResult | None, reason: str | None, started: float
    ) -> Decision:
        t = time.perf_counter()
        cands = stage.candidates
        llm_rank: dict[str, int] = {a: i for i, a in enumerate(llm.ranking)} if llm else {}
        prior = np.array([c.prior_score for c in cands], dtype=np.float64)
        scores = self.fusion.fused_scores(prior, [llm_rank.get(c.ad.ad_id) for c in cands]) if llm else prior
        pctr = self.fusion.pctr(scores)
        order = self._order(scores, cands)
        copy_for = (llm.copy_for or (llm.ranking[0] if llm.ranking else None)) if llm else None
        ctx = self._context(req)
        ukey = self.user_key(req.user_id)
        ads: list[RankedAd] = []
        copy_rejections: list[str] = []
        capped: list[str] = []
        for i in order:
            if len(ads) >= req.k:
                break
            c = cands[int(i)]
            if self.policy is not None:  # the final list is checked again, whatever produced it
                ok, why = is_eligible(c.ad, ctx, self.policy)
                if not ok:
                    stage.ineligible[c.ad.ad_id] = why or "ineligible"
                    continue
            if self.caps is not None and not self.caps.try_reserve(ukey, c.ad.ad_id, c.ad.advertiser):
                capped.append(c.ad.ad_id)
                continue
            orig = original_copy(c.ad)
            served, justification = orig, None
            if llm is not None and c.ad.ad_id == copy_for:
                copy_rejections.extend(llm.refusals)
                justification = llm.justification
                if justification and self.text_check is not None:
                    refused = self.text_check(justification, c.ad)
                    if refused:  # dropped, and counted with the copy refusals under its own prefix
                        justification = None
                        copy_rejections.extend(f"justification_{r}" for r in refused)
                if req.rewrite and llm.copy is not None:
                    problems = self.copy_check(llm.copy, c.ad) if self.copy_check else []
                    if problems:
                        copy_rejections.extend(problems)
                    else:
                        served = llm.copy
            p = float(pctr[int(i)])
            ads.append(
                RankedAd(
                    ad=c.ad,
                    score=round(float(scores[int(i)]), 6),
                    priors=c.priors,
                    llm_rank=llm_rank.get(c.ad.ad_id),
                    justification=justification,
                    copy=served,
                    original=orig,
                    pctr=round(p, 6),
                    expected_value=round(p * c.ad.bid, 6),
                )
            )
        stage.timings_ms["finalize"] = _ms(t)
        stage.timings_ms["total"] = _ms(started)
        usage = {}
        if llm is not None:
            usage = {"prompt_tokens": llm.prompt_tokens or 0, "completion_tokens": llm.completion_tokens or 0}
        decision = Decision(
            request_id=req.request_id or uuid.uuid4().hex,
            ads=ads,
            llm_used=llm is not None,
            degraded=bool(reason),
            degraded_reason=reason or None,
            prompt=self.prompt_info if llm is not None or reason else None,
            model=self.model_name if llm is not None else None,
            timings_ms={k: round(v, 3) for k, v in stage.timings_ms.items()},
            unknown_ids=stage.unknown_ids,
            ranking=[cands[int(i)].ad.ad_id for i in order] + stage.tail_ids,
            usage=usage,
            copy_rejections=copy_rejections,
            ineligible=stage.ineligible,
            capped=capped,
        )
        if self.audit is not None:
            self.audit(audit_record(decision, user_key=ukey, candidates=[c.ad.ad_id for c in cands]))
        return decision


def audit_record(d: Decision, *, user_key: str, candidates: list[str]) -> dict:
    """One line per impression. The user appears only as a keyed hash; free-text events never appear."""
    return {
        "event": "impression",
        "request_id": d.request_id,
        "user": user_key,
        "candidates": candidates,
        "chosen": [a.ad.ad_id for a in d.ads],
        "scores": [a.score for a in d.ads],
        "prompt_sha256": (d.prompt or {}).get("sha256"),
        "model": d.model,
        "llm_used": d.llm_used,
        "degraded": d.degraded,
        "degraded_reason": d.degraded_reason,
        "copy_rejections": d.copy_rejections,
        "copy_served": [a.copy != a.original for a in d.ads],
        "ineligible": len(d.ineligible),
        "capped": d.capped,
        "unknown_ids": len(d.unknown_ids),
        "timings_ms": d.timings_ms,
    }


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000
