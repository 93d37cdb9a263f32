"""Counting wrappers around REAL clients (not fakes): every call still reaches the wrapped client."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.llm import ChatLLMLike, Completion, Message


class CountingLLM:
    """Delegates to a real chat client and counts the calls that reach it."""

    def __init__(self, llm: ChatLLMLike):
        self.llm, self.calls = llm, 0

    @property
    def model(self) -> str:
        return self.llm.model

    def complete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        self.calls += 1
        return self.llm.complete(messages, schema=schema, timeout_s=timeout_s)

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        self.calls += 1
        return await self.llm.acomplete(messages, schema=schema, timeout_s=timeout_s)
