"""Scoring mode: one forward pass gives every candidate a probability (a verbalizer over letter labels).

The candidates are shown as A, B, C, … and the model is asked for one letter (`max_tokens=1`). The
first token's top log-probabilities give log P(label) for each candidate; normalised over the labels
shown, that is the candidate's log-probability for this order. Position bias is reduced by averaging
over P shown orders of the same candidates, sent as concurrent requests that share the prompt prefix:

* permutation 0 is the caller's order, permutation 1 its reverse (so each candidate is seen once
  near the top and once near the bottom), permutations 2… are shuffles seeded by `seed_key` (the
  request or impression id), so a request is reproducible.
* the LLM term of a candidate is the mean over the answered permutations of its normalised
  log-probability (`CandidateScores.logprob`); `prob` is the mean of the per-order probabilities
  (it sums to 1); `position` is the mean 0-based position it was shown at, and `by_order` keeps, per
  answered permutation, the position it was shown at and its log-probability there: what the fusion fit's
  position control is built from (eval.tune_score), as a model that repeats the order it is shown scores
  the top positions high. With P=2 (an order and its reverse) `position` is (n-1)/2 for every candidate,
  while a model that favours the first label still lifts both ends: the position is in `by_order`.

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
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


def permutations(n: int, count: int, *, seed_key: str) -> list[list[int]]:
    """`count` shown orders of n candidates (indexes into the caller's order): identity, reverse, then seeded shuffles."""
    if n < 1 or count < 1:
        raise ValueError("permutations need n >= 1 and count >= 1")
    orders = [list(range(n))]
    if count > 1:
        orders.append(list(range(n - 1, -1, -1)))
    for k in range(2, count):
        seed = int.from_bytes(hashlib.sha256(f"{seed_key}\x00{k}".encode()).digest()[:8], "big")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


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

    def ranking(self) -> list[str]:
        """Candidate ids by LLM term, best first; ties keep the caller's order."""
        return sorted(self.candidate_ids, key=lambda c: -self.logprob[c])


class LLMScorer:
    """Scores candidates with one-token answers over letter labels, averaged over P permutations."""

    def __init__(
        self,
        llm: LogprobLLMLike,
        prompt: PromptTemplate,
        *,
        permutations: int = 1,
        top_logprobs: int = 20,
        max_candidates: int = 20,
        max_title_chars: int = 70,
        max_text_chars: int = 0,
        max_history: int = 5,
        max_events: int = 3,
        max_event_chars: int = 100,
    ):
        if set(prompt.variables) != PROMPT_VARIABLES:
            raise PromptError(
                f"prompt {prompt.name!r} declares {sorted(prompt.variables)}; the scorer fills {sorted(PROMPT_VARIABLES)}"
            )
        if not 1 <= max_candidates <= len(LABELS):
            raise ValueError(f"max_candidates must be in 1..{len(LABELS)} (one single-token label each)")
        if permutations < 1 or top_logprobs < 1:
            raise ValueError("permutations and top_logprobs must be >= 1")
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
        """The P requests for the first `max_candidates` candidates (the caller orders them)."""
        sent = [c.ad for c in list(candidates)[: self.max_candidates]]
        if not sent:
            raise ValueError("scoring needs at least one candidate")
        ids = [ad.ad_id for ad in sent]
        if len(set(ids)) != len(ids):
            raise ValueError("candidate ids must be unique")
        history = [neutralise(ad.title, self.max_title_chars) for ad in list(history_ads)[-self.max_history :]]
        kept_events = [neutralise(e, self.max_event_chars) for e in list(events)[-self.max_events :] if e.strip()]
        labels = list(LABELS[: len(sent)])
        calls = []
        for order in permutations(len(sent), self.permutations, seed_key=seed_key):
            rows = [
                {"label": label, "title": neutralise(sent[i].title, self.max_title_chars), "text": self._text(sent[i])}
                for label, i in zip(labels, order, strict=True)
            ]
            messages = self.prompt.render(
                history=history, events=kept_events, candidates=rows, first_label=labels[0], last_label=labels[-1]
            )
            calls.append(ScoreCall(messages=messages, order=[ids[i] for i in order], labels=labels))
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
        ids = list(calls[0].order)  # permutation 0 is the caller's order
        sums = dict.fromkeys(ids, 0.0)
        probs = dict.fromkeys(ids, 0.0)
        positions = dict.fromkeys(ids, 0.0)
        by_order: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
        out = CandidateScores(
            candidate_ids=ids, logprob={}, prob={}, position={}, permutations=len(calls), answered=0, missing_labels=0,
            prompt=self.prompt.info(), model=self.llm.model,
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
                sums[ad_id] += parsed.logprob[label]
                probs[ad_id] += math.exp(parsed.logprob[label])
                positions[ad_id] += pos
                by_order[ad_id].append((pos, parsed.logprob[label]))
        log = {"prompt_sha256": out.prompt.get("sha256", "")[:12], "model": out.model, "n_candidates": len(ids)}
        if not out.answered:
            logger.warning("llm scoring failed", extra={**log, "failures": out.failures})
            raise errors[0]
        out.logprob = {i: sums[i] / out.answered for i in ids}
        out.prob = {i: probs[i] / out.answered for i in ids}
        out.position = {i: positions[i] / out.answered for i in ids}
        out.by_order = by_order
        logger.info(
            "llm score",
            extra={**log, "answered": out.answered, "permutations": out.permutations, "missing_labels": out.missing_labels,
                   "failures": out.failures, "latency_ms": [round(x, 1) for x in out.latency_ms]},
        )  # fmt: skip
        return out
