"""Scoring mode: one forward pass gives every candidate a probability (a verbalizer over letter labels).

The candidates are shown as A, B, C, … and the model is asked for one letter (`max_tokens=1`). The
first token's top log-probabilities give log P(label) for each candidate; normalised over the labels
shown, that is the candidate's log-probability for this order. Position bias is reduced by averaging
over P shown orders of the same candidates, sent as concurrent requests that share the prompt prefix.

The shown orders (`permutations`, the one place they are decided; the fit in eval.tune_score gets them
through this scorer):

* **canonical first.** The candidates are put in a canonical order that does not depend on the caller's:
  sorted by sha256(seed_key, ad id), `seed_key` being the request or impression id (reproducible per
  request, a different order for every request, so no ad is systematically shown first). Any input order
  of the same candidates therefore gives the same set of calls, the same answers and the same output.
* **balanced cyclic shifts.** Shown order k is the canonical order rotated by s_k = floor(k·n/P). With P = n
  (`ADSELECT_SCORE_PERMUTATIONS=all`; any P >= n means n, as there are only n rotations) the orders are a
  Latin square: every candidate is shown at every position exactly once, so a model that looks only at the
  position gives every candidate the same averaged term (exactly: sums are math.fsum). With P < n the
  shifts are evenly spaced, so each candidate's positions are spread n/P apart over the list.
* **ties and the output.** The LLM term of a candidate is the mean over the answered permutations of its
  normalised log-probability (`CandidateScores.logprob`); `ranking()` sorts by it and breaks ties by the
  canonical order, never the caller's, so the scorer's output is a function of the candidate set, the
  request id and the model only. `prob` is the mean of the per-order probabilities (it sums to 1);
  `position` is the mean 0-based position shown, and `by_order` keeps, per answered permutation, the
  position shown and the log-probability there: the fusion fit's position control (eval.tune_score).

What canonicalising buys and what it does not: the top-pick flip rate under a reordered input is 0 by
construction, for a reversed order and a shuffled one alike. It says nothing about whether the model reads
the content; that is measured by the LLM term's own MRR/nDCG against the position-only baseline, and how
order-robust the averaging itself is by the same design without the canonical step (`canonical=False`:
the rotations start from the caller's order), both in bench/bench_llm_modes.py.

A label absent from the returned top-K gets a floor: the smallest logprob returned (any token outside
the top K is at most that likely), and is counted in `missing_labels`. An answer whose top-K holds no
label at all is LLMOutputInvalid("no_label"); one without logprobs is LLMOutputInvalid("no_logprobs")
(from the client). A failed permutation is recorded in `failures` and the others are averaged; if all
fail, the first error is raised (LLMUnavailable or LLMOutputInvalid, for the caller's fast path).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kernel.errors import ConfigError, LLMOutputInvalid, LLMUnavailable, PromptError
from kernel.types import Ad, Candidate

from .logprob_llm import FirstToken, LogprobLLMLike
from .prompts import PromptRegistry, PromptTemplate, neutralise

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

LABELS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
NO_LABEL = "no_label"  # LLMOutputInvalid.reason: no candidate label among the returned top logprobs
PROMPT_VARIABLES = frozenset({"history", "events", "candidates", "first_label", "last_label"})


ALL = "all"  # ADSELECT_SCORE_PERMUTATIONS=all: P = n, every rotation (a Latin square)
Permutations = int | Literal["all"]


def shown_orders(n: int, count: Permutations) -> int:
    """How many shown orders P = `count` gives for n candidates: n for "all" or any count >= n."""
    if n < 1:
        raise ValueError("scoring needs n >= 1 candidates")
    if count == ALL:
        return n
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"permutations must be an int >= 1 or {ALL!r}, got {count!r}")
    return min(count, n)


def canonical_order(ids: Sequence[str], *, seed_key: str) -> list[int]:
    """Indexes of `ids` sorted by sha256(seed_key, id): the same for any order of the same ids."""
    return sorted(range(len(ids)), key=lambda i: (hashlib.sha256(f"{seed_key}\x00{ids[i]}".encode()).digest(), ids[i]))


def permutations(ids: Sequence[str], count: Permutations, *, seed_key: str, canonical: bool = True) -> list[list[int]]:
    """The shown orders (indexes into `ids`, the caller's order): rotations of the canonical order by
    floor(k·n/P), k = 0..P-1 (see the module doc). `canonical=False` rotates the caller's order instead:
    only for measuring how much the averaging itself depends on the input order."""
    n = len(ids)
    p = shown_orders(n, count)
    if len(set(ids)) != n:
        raise ValueError("candidate ids must be unique")
    base = canonical_order(ids, seed_key=seed_key) if canonical else list(range(n))
    return [[base[(j + (k * n) // p) % n] for j in range(n)] for k in range(p)]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass(frozen=True, slots=True)
class LabelLogprobs:
    """One permutation's answer: log P(label) normalised over the labels shown."""

    logprob: dict[str, float]  # label -> normalised log-probability
    missing: int  # labels not in the top-K (given the floor)


def label_logprobs(top: dict[str, float], labels: Sequence[str]) -> LabelLogprobs:
    """Normalised log-probabilities of `labels` from a first token's top logprobs.

    Token texts equal to a label after stripping spaces ("A", " A") are merged (log-sum-exp); a label
    not among them gets the floor min(top); no label at all raises LLMOutputInvalid("no_label")."""
    if not top:
        raise LLMOutputInvalid("no_logprobs", detail="empty top logprobs")
    wanted = set(labels)
    found: dict[str, list[float]] = {}
    for token, logprob in top.items():
        key = token.strip()
        if key in wanted:
            found.setdefault(key, []).append(logprob)
    if not found:
        raise LLMOutputInvalid(NO_LABEL, raw=" ".join(list(top)[:5]), detail=f"none of {len(labels)} labels in the top {len(top)}")
    floor = min(top.values())
    raw = {label: _logsumexp(found[label]) if label in found else floor for label in labels}
    total = _logsumexp(list(raw.values()))
    return LabelLogprobs(logprob={label: v - total for label, v in raw.items()}, missing=len(labels) - len(found))


@dataclass(frozen=True, slots=True)
class ScoreCall:
    """One permutation's request: kept for logs, eval reports and token counting."""

    messages: list[dict[str, str]]
    order: list[str]  # real candidate ids in shown order
    labels: list[str]  # labels[i] is shown for order[i]
    candidate_ids: list[str] = field(default_factory=list)  # the candidates sent, in the caller's order
    canonical: list[str] = field(default_factory=list)  # the same ids in the canonical order (the tie-break)


@dataclass(slots=True)
class CandidateScores:
    """Scores for the candidates sent (the first `max_candidates` of the caller's list)."""

    candidate_ids: list[str]  # in the caller's order
    logprob: dict[str, float]  # the LLM term: mean normalised log-probability over the answered permutations
    prob: dict[str, float]  # mean per-permutation probability (sums to 1)
    position: dict[str, float]  # mean 0-based position shown, over the answered permutations
    permutations: int  # requested
    answered: int  # permutations that gave usable logprobs
    missing_labels: int  # over the answered permutations: labels given the floor logprob
    failures: list[str] = field(default_factory=list)  # reason of each failed permutation
    by_order: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per answered permutation: (position shown, log-prob)
    prompt_tokens: list[int | None] = field(default_factory=list)  # per answered call
    completion_tokens: list[int | None] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    model: str = ""
    prompt: dict[str, str] = field(default_factory=dict)
    canonical: list[str] = field(default_factory=list)  # the candidate ids in the canonical order

    def ranking(self) -> list[str]:
        """Candidate ids by LLM term, best first; ties in the canonical order (never the caller's)."""
        rank = {c: i for i, c in enumerate(self.canonical or self.candidate_ids)}
        return sorted(self.candidate_ids, key=lambda c: (-self.logprob[c], rank[c]))


class LLMScorer:
    """Scores candidates with one-token answers over letter labels, averaged over P permutations."""

    def __init__(
        self,
        llm: LogprobLLMLike,
        prompt: PromptTemplate,
        *,
        permutations: Permutations = 1,
        top_logprobs: int = 20,
        max_candidates: int = 20,
        max_title_chars: int = 70,
        max_text_chars: int = 0,
        max_history: int = 5,
        max_events: int = 3,
        max_event_chars: int = 100,
        canonical: bool = True,
    ):
        if set(prompt.variables) != PROMPT_VARIABLES:
            raise PromptError(
                f"prompt {prompt.name!r} declares {sorted(prompt.variables)}; the scorer fills {sorted(PROMPT_VARIABLES)}"
            )
        if not 1 <= max_candidates <= len(LABELS):
            raise ValueError(f"max_candidates must be in 1..{len(LABELS)} (one single-token label each)")
        shown_orders(1, permutations)  # validates: an int >= 1 or "all"
        if top_logprobs < 1:
            raise ValueError("top_logprobs must be >= 1")
        if max_candidates > top_logprobs:
            # Refused, not chunked: a label that cannot be among the top-K returned would always get the floor.
            # vLLM caps top_logprobs at its --max-logprobs (20 by default): start it with a larger one to score more.
            raise ConfigError(
                "ADSELECT_SCORE_MAX_CANDIDATES",
                f"{max_candidates} candidates need top_logprobs >= {max_candidates} (ADSELECT_SCORE_TOP_LOGPROBS is {top_logprobs})",
            )
        self.llm = llm
        self.prompt = prompt
        self.permutations = permutations
        self.top_logprobs = top_logprobs
        self.max_candidates = max_candidates
        self.max_title_chars = max_title_chars
        self.max_text_chars = max_text_chars
        self.max_history = max_history
        self.max_events = max_events
        self.max_event_chars = max_event_chars
        self.canonical = canonical  # False only to measure the averaging without the canonical step (bench)

    @property
    def model(self) -> str:
        return self.llm.model

    @property
    def prompt_info(self) -> dict[str, str]:
        return self.prompt.info()

    @classmethod
    def from_settings(
        cls, settings: Settings, llm: LogprobLLMLike, *, registry: PromptRegistry | None = None, **options: Any
    ) -> LLMScorer:
        registry = registry or PromptRegistry(settings.prompts_dir)
        defaults: dict[str, Any] = {
            "permutations": settings.score_permutations,
            "top_logprobs": settings.score_top_logprobs,
            "max_candidates": settings.score_max_candidates,
            "max_text_chars": settings.llm_max_text_chars,
        }
        return cls(llm, registry.get(settings.score_prompt_name), **{**defaults, **options})

    def _text(self, ad: Ad) -> str:
        if self.max_text_chars <= 0:
            return ""
        text, title = neutralise(ad.text), neutralise(ad.title)
        if not text or title.startswith(text) or text.startswith(title):
            return ""
        return neutralise(text, self.max_text_chars)

    def prepare(
        self, *, history_ads: Sequence[Ad], events: Sequence[str], candidates: Sequence[Candidate], seed_key: str = ""
    ) -> list[ScoreCall]:
        """The P requests for the first `max_candidates` candidates (which ones the caller decides; the
        order shown is `permutations`', independent of the caller's)."""
        sent = [c.ad for c in list(candidates)[: self.max_candidates]]
        if not sent:
            raise ValueError("scoring needs at least one candidate")
        ids = [ad.ad_id for ad in sent]
        orders = permutations(ids, self.permutations, seed_key=seed_key, canonical=self.canonical)
        canonical = [ids[i] for i in canonical_order(ids, seed_key=seed_key)]
        history = [neutralise(ad.title, self.max_title_chars) for ad in list(history_ads)[-self.max_history :]]
        kept_events = [neutralise(e, self.max_event_chars) for e in list(events)[-self.max_events :] if e.strip()]
        labels = list(LABELS[: len(sent)])
        calls = []
        for order in orders:
            rows = [
                {"label": label, "title": neutralise(sent[i].title, self.max_title_chars), "text": self._text(sent[i])}
                for label, i in zip(labels, order, strict=True)
            ]
            messages = self.prompt.render(
                history=history, events=kept_events, candidates=rows, first_label=labels[0], last_label=labels[-1]
            )
            calls.append(ScoreCall(messages=messages, order=[ids[i] for i in order], labels=labels, candidate_ids=ids, canonical=canonical))
        return calls

    async def ascore(
        self,
        *,
        history_ads: Sequence[Ad],
        events: Sequence[str],
        candidates: Sequence[Candidate],
        timeout_s: float,
        seed_key: str = "",
    ) -> CandidateScores:
        """Score the candidates with P concurrent one-token calls; see the module doc for failures."""
        calls = self.prepare(history_ads=history_ads, events=events, candidates=candidates, seed_key=seed_key)
        answers = await asyncio.gather(
            *(self.llm.afirst_token(c.messages, top_logprobs=self.top_logprobs, timeout_s=timeout_s) for c in calls),
            return_exceptions=True,
        )
        return self._combine(calls, answers)

    def _combine(self, calls: list[ScoreCall], answers: list[FirstToken | BaseException]) -> CandidateScores:
        ids = list(calls[0].candidate_ids)
        # Per candidate, the log-probability (and position) of each answered order; summed with math.fsum, which
        # is exactly rounded, so the same values give the same term whatever order the calls were made in.
        by_order: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
        out = CandidateScores(
            candidate_ids=ids, logprob={}, prob={}, position={}, permutations=len(calls), answered=0, missing_labels=0,
            prompt=self.prompt.info(), model=self.llm.model, canonical=list(calls[0].canonical),
        )  # fmt: skip
        errors: list[LLMUnavailable | LLMOutputInvalid] = []
        for call, answer in zip(calls, answers, strict=True):
            if isinstance(answer, (LLMUnavailable, LLMOutputInvalid)):
                errors.append(answer)
                out.failures.append(answer.reason)
                continue
            if isinstance(answer, BaseException):
                raise answer
            try:
                parsed = label_logprobs(answer.top, call.labels)
            except LLMOutputInvalid as e:
                errors.append(e)
                out.failures.append(e.reason)
                continue
            out.answered += 1
            out.missing_labels += parsed.missing
            out.prompt_tokens.append(answer.prompt_tokens)
            out.completion_tokens.append(answer.completion_tokens)
            out.latency_ms.append(answer.latency_ms)
            for pos, (ad_id, label) in enumerate(zip(call.order, call.labels, strict=True)):
                by_order[ad_id].append((pos, parsed.logprob[label]))
        log = {"prompt_sha256": out.prompt.get("sha256", "")[:12], "model": out.model, "n_candidates": len(ids)}
        if not out.answered:
            logger.warning("llm scoring failed", extra={**log, "failures": out.failures})
            raise errors[0]
        out.logprob = {i: math.fsum(lp for _, lp in by_order[i]) / out.answered for i in ids}
        out.prob = {i: math.fsum(math.exp(lp) for _, lp in by_order[i]) / out.answered for i in ids}
        out.position = {i: sum(pos for pos, _ in by_order[i]) / out.answered for i in ids}
        out.by_order = by_order
        logger.info(
            "llm score",
            extra={**log, "answered": out.answered, "permutations": out.permutations, "missing_labels": out.missing_labels,
                   "failures": out.failures, "latency_ms": [round(x, 1) for x in out.latency_ms]},
        )  # fmt: skip
        return out
