"""LLM fakes that answer from the request itself (ChatLLMLike, like tests/utils/fakes.py's queue fake).

`FakeFunctionLLM(fn)`: each call returns `fn(messages, candidate_ids)`, where candidate_ids are the
ids the per-request schema allows (the ids the model was shown, in prompt order); `delay_s` makes
every async call wait first (without blocking the event loop), to hold LLM slots or interleave requests.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.llm import Completion, Message

Answer = Callable[[Sequence[Message], list[str]], str]


def honest(messages: Sequence[Message], ids: list[str]) -> str:
    """Keeps the prompt's (prior) order, plain justification, no rewrite."""
    return answer(ids, justification="Matches the user's recent interests.")


def answer(ranking: list[str], *, justification: str = "", headline: str = "", description: str = "") -> str:
    return json.dumps({"ranking": ranking, "justification": justification, "headline": headline, "description": description})


def prompt_text(messages: Sequence[Message]) -> str:
    return "\n".join(m["content"] if isinstance(m, dict) else str(m.content) for m in messages)


@dataclass
class FakeFunctionLLM:
    fn: Answer = honest
    delay_s: float = 0.0
    model: str = "fake-function"
    calls: list[dict[str, Any]] = field(default_factory=list)

    def _complete(self, messages: Sequence[Message], schema: dict[str, Any], timeout_s: float) -> Completion:
        ids = list(schema["properties"]["ranking"]["items"]["enum"])
        self.calls.append({"messages": list(messages), "ids": ids, "timeout_s": timeout_s})
        text = self.fn(messages, ids)
        return Completion(text=text, prompt_tokens=None, completion_tokens=None, latency_ms=self.delay_s * 1000, model=self.model, finish_reason="stop")

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self._complete(messages, schema, timeout_s)
