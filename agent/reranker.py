"""The LLM stage: prompt → chat call → validated ranking, justification and copy.

`LLMReranker` owns no transport: it receives a ChatLLMLike client and a PromptTemplate. It clips
what it sends (candidates, titles, texts, history, events) so the prompt stays small, asks for a
per-request schema, and returns an LLMResult whose ranking only holds ids of the candidates sent.
Errors: LLMUnavailable (from the client) and LLMOutputInvalid (from parsing) propagate to the caller,
which serves the fast path (as it does for any other exception of this stage). `arerank` is the one
call; `model` and `prompt_info` say what a decision it contributes to was made with.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kernel.errors import LLMOutputInvalid, PromptError
from kernel.types import Ad, Candidate, LLMResult

from .llm import ChatLLMLike, Completion
from .prompts import PromptRegistry, PromptTemplate, neutralise
from .review import screen
from .schema import ParsedOutput, build_output_schema, parse_llm_output

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

PROMPT_VARIABLES = frozenset({"history", "events", "candidates", "rewrite", "target"})


@dataclass(frozen=True, slots=True)
class RerankCall:
    """Everything sent for one rerank: kept for logs, eval reports and token counting."""

    messages: list[dict[str, str]]
    schema: dict[str, Any]
    candidate_ids: list[str]  # the real ad ids sent, in prompt order
    shown_ids: list[str]  # the ids the model sees (= candidate_ids, or "1".."N" with alias_ids)
    rewrite: bool
    prompt: dict[str, str]  # name, version, sha256
    target_id: str | None = None  # real id the justification and copy are written for
    target_ad: Ad | None = None  # that ad
    shown: tuple[Ad | str, ...] = ()  # the untrusted texts the model was shown: history and candidate ads, events

    def shown_target(self) -> str | None:
        """The target as the model sees it (its alias when ids are aliased)."""
        return None if self.target_id is None else self.shown_ids[self.candidate_ids.index(self.target_id)]

    def to_real(self, shown: list[str]) -> list[str]:
        real = dict(zip(self.shown_ids, self.candidate_ids, strict=True))
        return [real[s] for s in shown]


class LLMReranker:
    def __init__(
        self,
        llm: ChatLLMLike,
        prompt: PromptTemplate,
        *,
        max_candidates: int = 20,
        max_text_chars: int = 0,
        max_title_chars: int = 70,
        max_history: int = 5,
        max_events: int = 3,
        max_event_chars: int = 100,
        max_ranked: int | None = None,
        alias_ids: bool = False,
    ):
        if set(prompt.variables) != PROMPT_VARIABLES:
            raise PromptError(
                f"prompt {prompt.name!r} declares {sorted(prompt.variables)}; the reranker fills {sorted(PROMPT_VARIABLES)}"
            )
        if max_candidates < 1:
            raise ValueError("max_candidates must be >= 1")
        self.llm = llm
        self.prompt = prompt
        self.max_candidates = max_candidates
        self.max_text_chars = max_text_chars
        self.max_title_chars = max_title_chars
        self.max_history = max_history
        self.max_events = max_events
        self.max_event_chars = max_event_chars
        self.max_ranked = max_ranked
        self.alias_ids = alias_ids  # show "1".."N" instead of ad ids: ~5 fewer tokens per id, in and out

    @property
    def model(self) -> str:
        """The model name every decision this reranker contributes to carries."""
        return self.llm.model

    @property
    def prompt_info(self) -> dict[str, str]:
        """name, version, sha256 of the prompt: what decisions, audit lines and reports carry."""
        return self.prompt.info()

    @classmethod
    def from_settings(
        cls, settings: Settings, llm: ChatLLMLike, *, registry: PromptRegistry | None = None, **options: Any
    ) -> LLMReranker:
        registry = registry or PromptRegistry(settings.prompts_dir)
        defaults: dict[str, Any] = {
            "max_candidates": settings.llm_max_candidates,
            "max_text_chars": settings.llm_max_text_chars,
            "max_ranked": settings.llm_max_ranked,
            "alias_ids": settings.llm_alias_ids,
        }
        return cls(llm, registry.get(settings.prompt_name), **{**defaults, **options})

    def prepare(
        self,
        *,
        history_ads: Sequence[Ad],
        events: Sequence[str],
        candidates: Sequence[Candidate],
        rewrite: bool,
        target_id: str | None = None,
    ) -> RerankCall:
        """Render the prompt and schema for the first `max_candidates` candidates (the caller orders them).

        `target_id`: the candidate the justification and copy are written for (the ad the caller expects
        to serve); default the first candidate."""
        sent = list(candidates)[: self.max_candidates]
        if not sent:
            raise ValueError("rerank needs at least one candidate")
        shown_history = list(history_ads)[-self.max_history :]
        raw_events = [e for e in list(events)[-self.max_events :] if e.strip()]
        history = [neutralise(ad.title, self.max_title_chars) for ad in shown_history]
        kept_events = [neutralise(e, self.max_event_chars) for e in raw_events]
        ids = [c.ad.ad_id for c in sent]
        if len(set(ids)) != len(ids):
            raise ValueError("candidate ids must be unique")
        shown = [str(i + 1) for i in range(len(ids))] if self.alias_ids else ids
        rows = [
            {"id": sid, "title": neutralise(c.ad.title, self.max_title_chars), "text": self._text(c.ad)}
            for sid, c in zip(shown, sent, strict=True)
        ]
        target = target_id if target_id in ids else ids[0]
        shown_target = shown[ids.index(target)]
        messages = self.prompt.render(
            history=history, events=kept_events, candidates=rows, rewrite=rewrite, target=shown_target
        )
        schema = build_output_schema(shown, rewrite=rewrite, max_ranked=self.max_ranked)
        return RerankCall(
            messages=messages,
            schema=schema,
            candidate_ids=ids,
            shown_ids=shown,
            rewrite=rewrite,
            prompt=self.prompt.info(),
            target_id=target,
            target_ad=sent[ids.index(target)].ad,
            shown=(*shown_history, *(c.ad for c in sent), *raw_events),
        )

    def _text(self, ad: Ad) -> str:
        """The ad text clipped to max_text_chars; empty when it only repeats the title."""
        if self.max_text_chars <= 0:
            return ""
        text = neutralise(ad.text)
        if not text or neutralise(ad.title).startswith(text) or text.startswith(neutralise(ad.title)):
            return ""
        return neutralise(text, self.max_text_chars)

    async def arerank(
        self,
        *,
        history_ads: Sequence[Ad],
        events: Sequence[str],
        candidates: Sequence[Candidate],
        timeout_s: float,
        rewrite: bool,
        target_id: str | None = None,
    ) -> LLMResult:
        """Prepare the call, await the model, parse and clean its answer (the one entry point)."""
        call = self.prepare(
            history_ads=history_ads, events=events, candidates=candidates, rewrite=rewrite, target_id=target_id
        )
        completion = await self.llm.acomplete(call.messages, schema=call.schema, timeout_s=timeout_s)
        return self._result(call, completion)

    def _result(self, call: RerankCall, completion: Completion) -> LLMResult:
        log = {
            "prompt": call.prompt["name"],
            "prompt_version": call.prompt["version"],
            "prompt_sha256": call.prompt["sha256"][:12],
            "model": completion.model,
            "latency_ms": round(completion.latency_ms, 1),
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "n_candidates": len(call.candidate_ids),
        }
        try:
            parsed: ParsedOutput = parse_llm_output(
                completion.text,
                call.shown_ids,
                require_copy=call.rewrite,
                target_id=call.shown_target(),
            )
        except LLMOutputInvalid as e:
            if completion.finish_reason == "length":
                e = LLMOutputInvalid("truncated", raw=completion.text, detail=f"cut at max_tokens ({e.reason})")
            logger.warning("llm output invalid", extra={**log, "reason": e.reason, "output_head": completion.text[:300]})
            raise e from None
        logger.info(
            "llm rerank",
            extra={**log, "ranked": len(parsed.ranking), "dropped": parsed.dropped, "copy_rejected": parsed.copy_rejected},
        )
        justification, copy, refusals = screen(
            parsed.justification, parsed.copy, instructions=call.messages[0]["content"], ad=call.target_ad, untrusted=call.shown
        )
        if refusals:
            logger.info("llm output refused", extra={**log, "refusals": [str(r) for r in refusals]})
        return LLMResult(
            ranking=call.to_real(parsed.ranking),
            justification=justification,
            copy=copy,
            raw=completion.text,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            latency_ms=completion.latency_ms,
            copy_for=call.target_id,
            refusals=[str(r) for r in refusals],
            copy_rejected=parsed.copy_rejected,
        )
