"""The selection pipeline: the one core function the endpoint, the CLI and the eval harness all call.

    history/events ─▶ profile ─▶ candidates (eligible only) + prior features ─▶ fusion (prior score)
                  ─▶ [LLM admission: time left ∧ free slot ∧ breaker ⇒ LLM stage, by `llm_mode`:
                        listwise: rerank + justify + rewrite (one generated answer);
                        score: P one-token calls, every candidate's averaged label log-probability]
                  ─▶ fusion (prior + learned LLM term) ─▶ order (bid × pCTR or relevance)
                  ─▶ eligibility re-check + frequency-cap reservation ─▶ copy (reviewed model text) ─▶ Decision

Copy off the hot path (`copier` set: always in score mode, optionally in listwise): when the LLM stage
answered, the first served ad's rewrite comes from the copy cache (agent.copy_cache.BackgroundCopier): a hit
is a validated rewrite, checked again by the reviewer and served with no LLM call; a miss serves the
advertiser's copy at once and queues the rewrite in the background. Listwise mode with a copier asks the
model for no inline copy.

`Selector.aselect` is the one entry point (async; the CLI and benches `asyncio.run` it). The CPU-bound
stages run on a worker thread so the event loop stays free to answer (and shed) other requests.

The LLM stage is optional per request and globally; on any failure (of any exception type), timeout,
open breaker or busy LLM the prior ranking and the original copy are served with `degraded=True` and
the reason. Model text never changes a rule, a cap or an id: the LLM only contributes a ranking over
the ids it was sent (validated), one justification, and copy that must pass the deterministic checks.

Frequency caps: when the cap store fails, `caps_on_error` decides (closed: the ad is not served; open:
it is served unrecorded); either way its id is in `Decision.caps_unknown`. A failure after some ads
were reserved gives their reservations back and still writes an audit line (docs/SAFETY.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Literal, Protocol

import numpy as np

from kernel.errors import UserError
from kernel.reasons import DegradedReason
from kernel.types import Ad, Candidate, Copy, Decision, LLMResult, RankedAd, RequestContext, SelectRequest
from retrieval.candidates import CandidateGenerator, CandidateSet
from retrieval.features import FEATURES, build_profile
from retrieval.store import CatalogIndex
from selection.admission import Breaker, LLMAdmission, Limiter
from selection.caps import CapStore, CapStoreError, Reservation, reserve_in_order
from selection.experiments import Experiment
from selection.exploration import OFF, ExplorationConfig, explore
from selection.feedback import ServedAdRow
from selection.fusion import FusionModel
from selection.impression_log import ImpressionLogWriter, NullImpressionLog, ScoredEntry, ServedEntry, build_record
from selection.rules import EligibilityPolicy, EligibilityTable, chroma_where, is_eligible

_PRIOR_DIGITS = 6  # each prior feature is reported rounded to 6 decimals: round(v, 6)
_PRIOR_SCALE = 10.0**_PRIOR_DIGITS


def rounded_priors(features: np.ndarray) -> list[list[float]]:
    """round(v, _PRIOR_DIGITS) of every entry of a float32 feature matrix, as nested lists (rounded_prior_matrix)."""
    return rounded_prior_matrix(features).tolist()


def rounded_prior_matrix(features: np.ndarray) -> np.ndarray:
    """round(v, _PRIOR_DIGITS) of every entry of a float32 feature matrix, as float64, in one numpy pass.

    The same bits as Python's round: a float32 has a 24-bit significand and 10**6 = 15625 * 2**6 a 14-bit one,
    so v * 10**6 in float64 is exact; rint rounds that exact value half to even, as round does the exact
    decimal; and dividing the integer by 10**6 is correctly rounded, as round's conversion back from decimal."""
    if features.dtype != np.float32:
        raise TypeError(f"rounded_priors is exact for float32 features, not {features.dtype}")
    return np.rint(features.astype(np.float64) * _PRIOR_SCALE) / _PRIOR_SCALE


log = logging.getLogger(__name__)

AuditSink = Callable[[dict], None]
RankBy = Literal["expected_value", "relevance"]
CapsOnError = Literal["closed", "open"]


class Reranker(Protocol):
    """The LLM stage (agent.reranker.LLMReranker): a validated ranking, justification and copy."""

    @property
    def model(self) -> str: ...

    @property
    def prompt_info(self) -> dict[str, str]: ...

    async def arerank(
        self,
        *,
        history_ads: Sequence[Ad],
        events: Sequence[str],
        candidates: Sequence[Candidate],
        timeout_s: float,
        rewrite: bool,
        target_id: str | None = None,
    ) -> LLMResult: ...


class Scorer(Protocol):
    """Scoring mode's LLM stage (agent.scorer.LLMScorer): P one-token calls over letter labels."""

    @property
    def model(self) -> str: ...

    @property
    def prompt_info(self) -> dict[str, str]: ...

    async def ascore(
        self, *, history_ads: Sequence[Ad], events: Sequence[str], candidates: Sequence[Candidate], timeout_s: float, seed_key: str = ""
    ) -> "CandidateScoresLike": ...


class CandidateScoresLike(Protocol):
    """What the pipeline reads of agent.scorer.CandidateScores."""

    candidate_ids: list[str]
    logprob: dict[str, float]
    permutations: int
    answered: int
    missing_labels: int
    failures: list[str]
    prompt_tokens: list[int | None]
    completion_tokens: list[int | None]
    latency_ms: list[float]

    def ranking(self) -> list[str]: ...


class CopySource(Protocol):
    """Cached rewrites off the hot path (agent.copy_cache.BackgroundCopier)."""

    async def start(self) -> None: ...

    def cached_copy(self, ad: Ad, *, history_ads: Sequence[Ad]) -> Copy | None: ...


@dataclass(slots=True)
class ScoredLLMResult(LLMResult):
    """Scoring mode's answer: the ranking by averaged log-probability, and the values fusion uses."""

    logprob: dict[str, float] = field(default_factory=dict)  # the LLM term per scored candidate
    calls: int = 0  # permutation calls made (P)
    failed_calls: int = 0  # of which gave no usable answer (a parse failure such as no label, or an outage)
    missing_labels: int = 0  # labels absent from an answered call's top logprobs (given the floor, counted)

    @classmethod
    def from_scores(cls, scores: CandidateScoresLike) -> "ScoredLLMResult":
        return cls(
            ranking=scores.ranking(), justification=None, copy=None, raw="",
            prompt_tokens=sum(t or 0 for t in scores.prompt_tokens), completion_tokens=sum(t or 0 for t in scores.completion_tokens),
            latency_ms=max(scores.latency_ms, default=0.0), logprob=dict(scores.logprob), calls=scores.permutations,
            failed_calls=len(scores.failures), missing_labels=scores.missing_labels,
        )  # fmt: skip


class ReviewVerdict(Protocol):
    justification: str | None  # what may be shown, or None
    copy: Copy | None  # the rewrite that may replace the ad's own copy, or None
    reasons: tuple[str, ...]  # why anything was refused, one name each


class ModelTextReview(Protocol):
    """Decides what model text may be served (agent.review.ModelTextReviewer)."""

    def review(self, llm_result: LLMResult, ad: Ad, *, rewrite: bool, untrusted: Sequence[Ad | str] = ()) -> ReviewVerdict: ...

    def check_copy(self, copy: Copy, ad: Ad, *, untrusted: Sequence[Ad | str] = ()) -> Sequence[str]: ...


class EventEncoder(Protocol):
    """Encodes free-text events (retrieval.embedder.Embedder)."""

    def encode_cached(self, texts: list[str]) -> np.ndarray: ...


class ServedSink(Protocol):
    """Told what each decision served (selection.served_queue.ServedQueue: a queue put)."""

    def put(self, *, request_id: str, user_key: str, ads: Sequence[ServedAdRow], arm: str, now: float) -> bool: ...

    def flush(self, timeout_s: float = 5.0) -> bool: ...


@dataclass(frozen=True)
class ArmPolicy:
    """An experiment arm at serving time: its own selector (fusion weights, reranker), LLM switch, exploration."""

    name: str
    exploration: ExplorationConfig = OFF
    llm: bool | None = None  # False: this arm never calls the LLM (not a degradation)
    selector: "Selector | None" = None  # None: the root selector serves it as it is


@dataclass(frozen=True)
class Turn:
    """Per-request facts decided before the stages: the arm, consent, the keyed user."""

    arm: ArmPolicy
    personalized: bool
    user_key: str
    root: "Selector"


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
    # what each candidate's `priors` holds, as one (len(candidates), len(FEATURES)) float64 matrix, rows in candidate
    # order (eval's single-feature baselines read its columns); None: not computed for this stage
    head_priors: np.ndarray | None = None


@dataclass
class Served:
    """What the serving step chose: the ads, and what it skipped or could not check."""

    ads: list[RankedAd] = field(default_factory=list)
    copy_rejections: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    caps_unknown: list[str] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)


def scoring_seed_key(req: SelectRequest) -> str:
    """The scoring mode's seed key for a request (it fixes the canonical order of the candidates shown):
    its draw id (the caller's impression id, else the request id), else the user id. Eval's re-scoring of
    reordered candidates uses the same key."""
    return req.draw_id(req.user_id)


@dataclass
class Selector:
    index: CatalogIndex
    generator: CandidateGenerator
    fusion: FusionModel
    embedder: EventEncoder | None = None  # needed only for free-text events
    reranker: Reranker | None = None  # None: the LLM stage is off (requests asking for it are degraded)
    llm_mode: Literal["listwise", "score"] = "listwise"  # which LLM stage serves: `reranker` or `scorer`
    scorer: Scorer | None = None  # scoring mode's stage; None in score mode: requests asking for the LLM are degraded
    copier: CopySource | None = None  # rewrites from the copy cache (off the hot path); None: inline copy (listwise) or none
    admission: LLMAdmission = field(default_factory=LLMAdmission)  # breaker, limiter, time budget
    reviewer: ModelTextReview | None = None  # agent.review.ModelTextReviewer; None: model text is never served
    policy: EligibilityPolicy | None = None  # None: every ad is eligible (offline replay)
    caps: CapStore | None = None  # None: no frequency caps (offline replay)
    caps_on_error: CapsOnError = "closed"  # the cap store failed: serve nothing capped-unknown, or serve it unrecorded
    user_key: Callable[[str], str] = lambda u: u  # keyed hash for caps and logs
    audit: AuditSink | None = None
    rank_by: RankBy = "relevance"
    recency_decay: float = 0.8
    exclude_history: bool = True
    llm_max_candidates: int = 20
    # ---- the closed loop (selection/services.py builds these; the defaults log nothing, one arm) ----
    experiment: Experiment = field(default_factory=Experiment.single)
    arm_policies: dict[str, ArmPolicy] = field(default_factory=dict)
    impressions: ImpressionLogWriter = field(default_factory=NullImpressionLog)
    served_sink: ServedSink | None = None
    hash_events: Callable[[Sequence[str]], list[str]] = lambda events: []
    versions: dict[str, str | None] = field(default_factory=dict)  # weights, experiment, behaviour, prompt
    log_sync: bool = False  # wait for the impression log writer before answering (durable before acknowledged)
    _eligibility: tuple[CatalogIndex, EligibilityTable] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def breaker(self) -> Breaker | None:
        return self.admission.breaker

    @property
    def limiter(self) -> Limiter | None:
        return self.admission.limiter

    # ---- the entry point ---------------------------------------------------------------------
    async def aselect(self, req: SelectRequest, *, stage: PriorStage | None = None, fast_path_on_loop: bool = False) -> Decision:
        """Choose the ads for one request.

        `stage`: this request's prior stage, already computed by the caller (eval reuses the one it
        ranked the baselines with); the deadline then counts from this call. `fast_path_on_loop`: the fast
        path runs on the calling thread (the event loop), not on a worker thread.

        The arm is assigned first (keyed user hash); it serves with its own selector (fusion weights,
        reranker), LLM switch and exploration. Without consent the request loses its history and events."""
        started = time.perf_counter()
        turn = self.turn(req)
        req = self.apply_turn(req, turn)
        sel = turn.arm.selector or self
        if sel.copier is not None and req.use_llm and req.rewrite:
            await sel.copier.start()  # idempotent: the workers run on this event loop
        if stage is None and not req.use_llm:  # the fast path: one hop to the worker thread, not two
            if fast_path_on_loop:
                return sel._fast_path(req, started, turn)
            return await asyncio.to_thread(sel._fast_path, req, started, turn)
        if stage is None:
            stage = await asyncio.to_thread(sel.prior_stage, req)
        llm, reason = await sel._llm_stage(req, stage, started)
        return await asyncio.to_thread(sel._finish, req, stage, llm, reason, started, turn)

    def turn(self, req: SelectRequest) -> Turn:
        ukey = self.user_key(req.user_id)
        arm = self.experiment.assign(ukey)
        policy = self.arm_policies.get(arm.name) or ArmPolicy(arm.name, arm.variant.exploration, arm.variant.llm)
        personalized = not (req.context is not None and req.context.consent is False)
        return Turn(arm=policy, personalized=personalized, user_key=ukey, root=self)

    @staticmethod
    def apply_turn(req: SelectRequest, turn: Turn) -> SelectRequest:
        if not turn.personalized:
            req = replace(req, history=[], events=[])
        if turn.arm.llm is False:
            req = replace(req, use_llm=False)
        return req

    def _fast_path(self, req: SelectRequest, started: float, turn: Turn) -> Decision:
        return self._finish(req, self.prior_stage(req), None, None, started, turn)

    # ---- stage 1: priors -------------------------------------------------------------------
    def _context(self, req: SelectRequest) -> RequestContext:
        return req.context if req.context is not None else RequestContext(now=datetime.now(timezone.utc).replace(tzinfo=None))

    def _eligibility_table(self) -> EligibilityTable:
        """Built once per catalog index (a reload that swaps the index builds a new one)."""
        cached = self._eligibility
        if cached is None or cached[0] is not self.index:
            cached = self._eligibility = (self.index, EligibilityTable.from_ads(self.index.ads))
        return cached[1]

    def _eligible(self, cset: CandidateSet, ctx: RequestContext | None, ineligible: dict[str, str]) -> CandidateSet:
        """`ctx` is None only without a policy (nothing to check)."""
        if self.policy is None:
            return cset
        keep, reasons = self._eligibility_table().check(cset.rows, self.index.ads, ctx, self.policy)
        for row, reason in reasons.items():
            ineligible[self.index.ids[row]] = reason
        if keep.all():
            return cset
        return CandidateSet(cset.rows[keep], cset.features[keep], cset.by_source)

    def prior_stage(self, req: SelectRequest) -> PriorStage:
        t = time.perf_counter()
        timings: dict[str, float] = {}
        ctx = self._context(req) if self.policy is not None else None  # read only by the eligibility rules
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
        top = order[:head]
        ads = self.index.ads
        head_priors = rounded_prior_matrix(cset.features[top])
        cands = [
            Candidate(ads[row], dict(zip(FEATURES, feats)), score, rank)
            for rank, (row, feats, score) in enumerate(zip(cset.rows[top].tolist(), head_priors.tolist(), scores[top].tolist()))
        ]
        tail = self.index.id_array[cset.rows[order[head:]]].tolist()
        timings["fusion"] = _ms(t)
        history_ads = list(map(ads.__getitem__, hist_rows))
        return PriorStage(cands, tail, history_ads, list(dict.fromkeys(unknown)), ineligible, timings, head_priors)

    # ---- stage 2: LLM ------------------------------------------------------------------------
    async def _llm_stage(
        self, req: SelectRequest, stage: PriorStage, started: float
    ) -> tuple[LLMResult | None, DegradedReason | None]:
        """(result, None) when the LLM answered; (None, reason) when degraded; (None, None) when not asked for."""
        if not req.use_llm or len(stage.candidates) < 2:
            return None, None
        if self._llm_stage_object() is None:
            return None, DegradedReason.LLM_DISABLED
        result: LLMResult | None = None
        t = time.perf_counter()
        with self.admission.enter(deadline_ms=req.deadline_ms, started=started) as permit:
            if permit.refused is None and self.llm_mode == "score":
                assert self.scorer is not None
                scoring = self.scorer.ascore(
                    history_ads=stage.history_ads, events=req.events, candidates=stage.candidates[: self.llm_max_candidates],
                    timeout_s=permit.budget_s, seed_key=scoring_seed_key(req),
                )  # fmt: skip
                result = ScoredLLMResult.from_scores(await asyncio.wait_for(scoring, timeout=permit.budget_s))
            elif permit.refused is None:
                assert self.reranker is not None
                call = self.reranker.arerank(**self._llm_args(req, stage), timeout_s=permit.budget_s)
                result = await asyncio.wait_for(call, timeout=permit.budget_s)
        if permit.refused is None:
            stage.timings_ms["llm"] = _ms(t)
        return result, permit.reason

    def _llm_stage_object(self) -> Reranker | Scorer | None:
        """The stage `llm_mode` serves with (its model and prompt go into the decision), or None: off."""
        return self.scorer if self.llm_mode == "score" else self.reranker

    def _llm_args(self, req: SelectRequest, stage: PriorStage) -> dict:
        sent = stage.candidates[: self.llm_max_candidates]
        # The justification and copy are written for the ad the service expects to serve: the first of the
        # final order computed without the LLM (the LLM's ranking moves it only through its learned weight).
        # The order is of every scored candidate (a list-aware pCTR is computed over the whole list), restricted to those sent.
        prior = np.array([c.prior_score for c in stage.candidates], dtype=np.float64)
        target = next(stage.candidates[int(i)].ad.ad_id for i in self._order(prior, stage.candidates) if int(i) < len(sent))
        rewrite = req.rewrite and self.copier is None  # with a copier the copy comes from its cache, not this call
        return dict(history_ads=stage.history_ads, events=req.events, candidates=sent, rewrite=rewrite, target_id=target)

    def _order(self, scores: np.ndarray, cands: list[Candidate], pctr: np.ndarray | None = None) -> np.ndarray:
        """`pctr`: fusion.pctr(scores) when the caller has it already (computed once per request)."""
        bids = np.array([c.ad.bid for c in cands], dtype=np.float64)
        pctr = self.fusion.pctr(scores) if pctr is None else pctr
        return serving_order(scores, pctr=pctr, bids=bids, rank_by=self.rank_by)

    # ---- stage 3: fuse, order, serve (rules, caps, copy), decide -----------------------------
    def _finish(
        self,
        req: SelectRequest,
        stage: PriorStage,
        llm: LLMResult | None,
        reason: str | None,
        started: float,
        turn: Turn | None = None,
    ) -> Decision:
        t = time.perf_counter()
        turn = turn or self.turn(req)
        cands = stage.candidates
        llm_rank: dict[str, int] = {a: i for i, a in enumerate(llm.ranking)} if llm else {}
        prior = np.array([c.prior_score for c in cands], dtype=np.float64)
        if isinstance(llm, ScoredLLMResult):
            scores = self.fusion.fused_logprob_scores(prior, [llm.logprob.get(c.ad.ad_id) for c in cands])
        elif llm is not None:
            scores = self.fusion.fused_scores(prior, [llm_rank.get(c.ad.ad_id) for c in cands])
        else:
            scores = prior
        pctr = self.fusion.pctr(scores)  # once: the order, the served ads and the log record read it
        order = self._order(scores, cands, pctr)
        ukey = turn.user_key
        request_id = req.request_id or uuid.uuid4().hex
        candidate_ids = [c.ad.ad_id for c in cands]
        served = Served()
        try:
            serve_args = dict(scores=scores, pctr=pctr, order=order, llm_rank=llm_rank, ukey=ukey, out=served)
            if turn.arm.exploration.randomised:
                self._serve_explored(req, stage, llm, **serve_args, config=turn.arm.exploration, seed_key=f"{turn.arm.name}:{req.draw_id(request_id)}")
            else:
                self._serve(req, stage, llm, **serve_args)
            stage.timings_ms["finalize"] = _ms(t)
            stage.timings_ms["total"] = _ms(started)
            decision = self._decision(req, stage, llm, reason, request_id=request_id, order=order, served=served)
            decision.arm = turn.arm.name
            decision.personalized = turn.personalized
            decision.versions = {**turn.root.versions, **self.versions}
            if decision.prompt:
                decision.versions["prompt"] = decision.prompt.get("sha256")
            if self.audit is not None:
                self.audit(audit_record(decision, user_key=ukey, candidates=candidate_ids))
            self._log_decision(req, stage, decision, scores=scores, pctr=pctr, turn=turn)
        except BaseException as exc:  # nothing is served: give the reservations back, say so in the audit log
            self._give_back(served.reservations)
            self._audit_failure(request_id, user_key=ukey, candidates=candidate_ids, error=exc, released=len(served.reservations))
            raise
        return decision

    def _log_decision(
        self, req: SelectRequest, stage: PriorStage, d: Decision, *, scores: np.ndarray, pctr: np.ndarray, turn: Turn
    ) -> None:
        """One impression-log record and the served rows for feedback: queue puts only (unless log_sync)."""
        root = turn.root
        if isinstance(root.impressions, NullImpressionLog) and root.served_sink is None:
            return
        ctx = self._context(req)
        score_of, pctr_of = scores.tolist(), pctr.tolist()  # Python floats at once, not one numpy scalar per candidate
        scored = [
            ScoredEntry(c.ad.ad_id, c.priors, score=round(score_of[i], 6), pctr=round(pctr_of[i], 6))
            for i, c in enumerate(stage.candidates)
        ]
        served = [ServedEntry(a.ad.ad_id, propensity=a.propensity, pctr=a.pctr, bid=a.ad.bid, score=a.score) for a in d.ads]
        record = build_record(
            request_id=d.request_id,
            impression_id=req.draw_id(d.request_id),
            user_key=turn.user_key,
            now=ctx.now,
            history=req.history,
            event_hashes=root.hash_events(req.events),
            scored=scored,
            served=served,
            arm=d.arm,
            exploration=turn.arm.exploration.model_dump() if turn.arm.exploration.randomised else None,
            weights_version=d.versions.get("weights"),
            prompt_sha256=(d.prompt or {}).get("sha256"),
            model=d.model,
            llm_used=d.llm_used,
            degraded_reason=d.degraded_reason,
            personalized=d.personalized,
        )
        for entry, c in zip(record["scored"], stage.candidates):  # the bid of every scored ad: a target ranking by bid × pCTR is replayable
            entry["bid"] = c.ad.bid
        record["versions"] = d.versions
        root.impressions.write(record)
        if root.served_sink is not None:
            rows = [ServedAdRow(a.ad.ad_id, a.ad.advertiser, a.ad.bid) for a in d.ads]
            root.served_sink.put(request_id=d.request_id, user_key=turn.user_key, ads=rows, arm=d.arm, now=time.time())
        if root.log_sync:  # durable before acknowledged: the record and the served rows are written before the answer
            root.impressions.flush(5.0)
            if root.served_sink is not None:
                root.served_sink.flush(5.0)

    def _audit_failure(self, request_id: str, *, user_key: str, candidates: list[str], error: BaseException, released: int) -> None:
        if self.audit is None:
            return
        try:
            self.audit(failure_record(request_id, user_key=user_key, candidates=candidates, error=error, released=released))
        except Exception:  # the sink itself may be what failed
            log.exception("audit line of a failed request not written", extra={"request_id": request_id})

    def _serve(
        self,
        req: SelectRequest,
        stage: PriorStage,
        llm: LLMResult | None,
        *,
        scores: np.ndarray,
        pctr: np.ndarray,
        order: np.ndarray,
        llm_rank: dict[str, int],
        ukey: str,
        out: Served,
    ) -> None:
        """Walk the order until k ads: re-check eligibility, reserve the caps, choose the copy (into `out`)."""
        ctx = self._context(req)
        # the final list is checked again, whatever produced it: one verdict per candidate, read twice below
        why_not = self._recheck(stage.candidates, ctx) if self.policy is not None else {}
        verdicts = self._reserve_all(req, stage, order, why_not=why_not, ukey=ukey, out=out) if self.caps is not None else {}
        for i in order:
            skipped_unknown = len(out.caps_unknown) if self.caps_on_error == "closed" else 0
            if len(out.ads) + skipped_unknown >= req.k:  # closed: the ads it would have served are listed, not served
                break
            c = stage.candidates[int(i)]
            if int(i) in why_not:
                stage.ineligible[c.ad.ad_id] = why_not[int(i)]
                continue
            if self.caps is not None:
                verdict = verdicts.get(c.ad.ad_id, "unknown")
                if verdict == "capped":
                    out.capped.append(c.ad.ad_id)
                    continue
                if verdict == "unknown":
                    out.caps_unknown.append(c.ad.ad_id)
                    if self.caps_on_error == "closed":
                        continue
            out.ads.append(self._ranked(c, llm, req, stage, out, score=float(scores[int(i)]), pctr=float(pctr[int(i)]), llm_rank=llm_rank))

    def _ranked(
        self,
        c: Candidate,
        llm: LLMResult | None,
        req: SelectRequest,
        stage: PriorStage,
        out: Served,
        *,
        score: float,
        pctr: float,
        llm_rank: dict[str, int],
        propensity: float = 1.0,
    ) -> RankedAd:
        """One served ad: its scores, the copy the review lets through, its propensity under the policy."""
        copy, justification = self._choose_copy(c, llm, req, stage, out.copy_rejections, first=not out.ads)
        return RankedAd(
            ad=c.ad,
            score=round(score, 6),
            priors=c.priors,
            llm_rank=llm_rank.get(c.ad.ad_id),
            justification=justification,
            copy=copy,
            original=original_copy(c.ad),
            pctr=round(pctr, 6),
            expected_value=round(pctr * c.ad.bid, 6),
            propensity=propensity,
        )

    def _serve_explored(
        self,
        req: SelectRequest,
        stage: PriorStage,
        llm: LLMResult | None,
        *,
        scores: np.ndarray,
        pctr: np.ndarray,
        order: np.ndarray,
        llm_rank: dict[str, int],
        ukey: str,
        out: Served,
        config: ExplorationConfig,
        seed_key: str,
    ) -> None:
        """Draw the slate with exact propensities (selection.exploration) among admissible candidates.

        Admissible = eligible now, and both frequency caps still open *read* from the cap store (counts,
        no reservation); an advertiser's ads already drawn above count against its cap. Only the drawn
        ads are reserved. A reservation refused by a parallel request's race is skipped (listed in capped)."""
        ctx = self._context(req)
        cands = stage.candidates
        state = {"store_down": False}
        ok: dict[int, bool] = {}
        adv_used: dict[str, int] = {}

        def open_for(i: int) -> bool:
            if i in ok:
                return ok[i]
            ad = cands[i].ad
            good = True
            if self.policy is not None:
                fine, why = is_eligible(ad, ctx, self.policy)
                if not fine:
                    stage.ineligible[ad.ad_id] = why or "ineligible"
                    good = False
            if good and self.caps is not None and not state["store_down"]:
                try:
                    cfg = self.caps.config
                    if cfg.max_per_ad is not None and self.caps.count(ukey, ad_id=ad.ad_id) >= cfg.max_per_ad:
                        out.capped.append(ad.ad_id)
                        good = False
                    elif ad.advertiser and cfg.max_per_advertiser is not None:
                        adv_used.setdefault(ad.advertiser, self.caps.count(ukey, advertiser=ad.advertiser))
                except CapStoreError as e:
                    log.warning("cap store failed", extra={"error": str(e), "caps_on_error": self.caps_on_error})
                    state["store_down"] = True
            if good and self.caps is not None and state["store_down"]:
                out.caps_unknown.append(ad.ad_id)
                good = self.caps_on_error == "open"
            ok[i] = good
            return good

        def admissible(i: int, prefix: tuple[int, ...]) -> bool:
            if not open_for(i):
                return False
            ad = cands[i].ad
            cfg = self.caps.config if self.caps is not None else None
            if cfg is None or cfg.max_per_advertiser is None or not ad.advertiser or ad.advertiser not in adv_used:
                return True
            above = sum(1 for j in prefix if cands[j].ad.advertiser == ad.advertiser)
            return adv_used[ad.advertiser] + above < cfg.max_per_advertiser

        drawn = explore(order=[int(i) for i in order], scores=scores.tolist(), k=req.k, config=config, seed_key=seed_key, admissible=admissible)
        for i, p in zip(drawn.served, drawn.propensities):
            c = cands[i]
            if self.caps is not None and not state["store_down"]:
                got, error = reserve_in_order(self.caps, ukey, [(c.ad.ad_id, c.ad.advertiser)], limit=1, reserved=out.reservations)
                if error is not None:  # the store failed between the read and the reservation: the policy decides
                    log.warning("cap store failed", extra={"error": str(error), "caps_on_error": self.caps_on_error})
                    state["store_down"] = True
                    out.caps_unknown.append(c.ad.ad_id)
                    if self.caps_on_error != "open":
                        continue
                elif not got or got[0] is None:
                    out.capped.append(c.ad.ad_id)
                    continue
            out.ads.append(
                self._ranked(c, llm, req, stage, out, score=float(scores[i]), pctr=float(pctr[i]), llm_rank=llm_rank, propensity=p)
            )

    def _recheck(self, cands: list[Candidate], ctx: RequestContext) -> dict[int, str]:
        """{candidate index: reason} for the candidates `is_eligible()` refuses now (the serving-time re-check),
        in one vectorised check over their catalog rows (EligibilityTable.check is exact). A candidate whose ad
        is not the current index's object at its row (the index was swapped since the prior stage) is
        checked by `is_eligible()` on its own ad."""
        assert self.policy is not None
        index, row_of = self.index, self.index.row
        rows = [row_of.get(c.ad.ad_id, -1) for c in cands]
        same = [r >= 0 and index.ads[r] is c.ad for r, c in zip(rows, cands)]
        out: dict[int, str] = {}
        on_table = [i for i, ok in enumerate(same) if ok]
        if on_table:
            table_rows = np.asarray([rows[i] for i in on_table], dtype=np.int64)
            _, reasons = self._eligibility_table().check(table_rows, index.ads, ctx, self.policy)
            for i, r in zip(on_table, table_rows.tolist()):
                if r in reasons:
                    out[i] = reasons[r]
        for i, ok in enumerate(same):
            if not ok:
                fine, why = is_eligible(cands[i].ad, ctx, self.policy)
                if not fine:
                    out[i] = why or "ineligible"
        return out

    def _reserve_all(
        self, req: SelectRequest, stage: PriorStage, order: np.ndarray, *, why_not: dict[int, str], ukey: str, out: Served
    ) -> dict[str, str]:
        """ad_id -> "reserved" | "capped" for the eligible ads in serving order (`why_not`: the ineligible
        candidates, by index), until k are reserved, in one round trip to the cap store
        (selection.caps.reserve_in_order). Ads it did not reach, or could not check because the store
        failed, are absent: "unknown". After a failure the store is not asked again in this request (its
        answer would come late, if at all)."""
        ads = [stage.candidates[i].ad for i in order.tolist() if i not in why_not]
        got, error = reserve_in_order(
            self.caps, ukey, [(a.ad_id, a.advertiser) for a in ads], limit=req.k, reserved=out.reservations  # type: ignore[arg-type]
        )
        if error is not None:
            log.warning("cap store failed", extra={"error": str(error), "caps_on_error": self.caps_on_error})
        return {a.ad_id: ("reserved" if r is not None else "capped") for a, r in zip(ads, got)}

    def _give_back(self, reservations: list[Reservation]) -> None:
        for r in reservations:
            try:
                self.caps.release(r)  # type: ignore[union-attr]
            except CapStoreError as e:
                log.warning("cap reservation not given back", extra={"error": str(e), "ad_id": r.ad_id})

    def _choose_copy(
        self, c: Candidate, llm: LLMResult | None, req: SelectRequest, stage: PriorStage, rejections: list[str], *, first: bool
    ) -> tuple[Copy, str | None]:
        """The copy and justification served with `c` (`first`: the first ad served); reasons for refused model
        text go to `rejections`.

        The one place model text is let through to the response: the LLM wrote for one ad (`copy_for`), and
        the reviewer's verdict (agent/review.py) decides what of it may be served, else the original is. With a
        copier, the first served ad's rewrite is its cached validated rewrite, checked again here (no LLM call)."""
        orig = original_copy(c.ad)
        if self.reviewer is None:
            return orig, None
        # Everything the model was shown is untrusted: the history, the candidates sent, the user's events.
        untrusted = [*stage.history_ads, *(x.ad for x in stage.candidates[: self.llm_max_candidates]), *req.events]
        copy, justification = orig, None
        copy_for = (llm.copy_for or (llm.ranking[0] if llm.ranking else None)) if llm else None
        if llm is not None and c.ad.ad_id == copy_for and not isinstance(llm, ScoredLLMResult):
            verdict = self.reviewer.review(llm, c.ad, rewrite=req.rewrite and self.copier is None, untrusted=untrusted)
            rejections.extend(str(r) for r in verdict.reasons)
            copy, justification = (verdict.copy if verdict.copy is not None else orig), verdict.justification
        # Only when the LLM stage answered: a degraded decision is the fast path's, copy included (and a miss
        # would queue a rewrite for a server that just failed).
        if self.copier is not None and first and llm is not None and req.rewrite:
            cached = self.copier.cached_copy(c.ad, history_ads=stage.history_ads)
            if cached is not None:
                problems = [str(r) for r in self.reviewer.check_copy(cached, c.ad, untrusted=untrusted)]
                rejections.extend(problems)
                copy = orig if problems else cached
        return copy, justification

    def _decision(
        self,
        req: SelectRequest,
        stage: PriorStage,
        llm: LLMResult | None,
        reason: str | None,
        *,
        request_id: str,
        order: np.ndarray,
        served: Served,
    ) -> Decision:
        usage = {}
        if llm is not None:
            usage = {"prompt_tokens": llm.prompt_tokens or 0, "completion_tokens": llm.completion_tokens or 0, "llm_calls": 1}
        if isinstance(llm, ScoredLLMResult):
            usage.update(llm_calls=llm.calls, score_failed_calls=llm.failed_calls, score_missing_labels=llm.missing_labels)
        reranker = self._llm_stage_object()
        return Decision(
            request_id=request_id,
            ads=served.ads,
            llm_used=llm is not None,
            degraded=bool(reason),
            degraded_reason=reason or None,
            prompt=reranker.prompt_info if reranker is not None and (llm is not None or reason) else None,
            model=reranker.model if reranker is not None and llm is not None else None,
            timings_ms={k: round(v, 3) for k, v in stage.timings_ms.items()},
            unknown_ids=stage.unknown_ids,
            ranking=[stage.candidates[int(i)].ad.ad_id for i in order] + stage.tail_ids,
            usage=usage,
            copy_rejections=served.copy_rejections,
            ineligible=stage.ineligible,
            capped=served.capped,
            caps_unknown=served.caps_unknown,
        )


def serving_order(scores: np.ndarray, *, pctr: np.ndarray, bids: np.ndarray, rank_by: RankBy) -> np.ndarray:
    """The serving order of scored candidates (indices, best first): bid × pCTR, ties by relevance, or
    relevance alone (ties by position). The one rule: the endpoint serves by it, and eval replays it (the
    `served` system of `adselect eval run`, the targets of `adselect eval ope`)."""
    if rank_by == "expected_value":
        return np.lexsort((-scores, -(np.asarray(pctr, dtype=np.float64) * np.asarray(bids, dtype=np.float64))))
    return np.argsort(-scores, kind="stable")


def audit_record(d: Decision, *, user_key: str, candidates: list[str]) -> dict:
    """One line per impression. The user appears only as a keyed hash; free-text events never appear."""
    return {
        "event": "impression",
        "request_id": d.request_id,
        "user": user_key,
        "arm": d.arm,
        "personalized": d.personalized,
        "propensities": [a.propensity for a in d.ads],
        "versions": d.versions,
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
        "caps_unknown": d.caps_unknown,
        "unknown_ids": len(d.unknown_ids),
        "timings_ms": d.timings_ms,
    }


def failure_record(request_id: str, *, user_key: str, candidates: list[str], error: BaseException, released: int) -> dict:
    """The audit line of a request that failed while choosing its ads: nothing was served, `released`
    cap reservations were given back. The error appears by type only."""
    return {
        "event": "impression",
        "request_id": request_id,
        "user": user_key,
        "candidates": candidates,
        "chosen": [],
        "error": type(error).__name__,
        "released": released,
    }


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000
