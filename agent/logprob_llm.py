"""A one-token chat call that returns the first token's top log-probabilities (scoring mode's transport).

`LogprobChatLLM` goes through langchain_openai.ChatOpenAI bound with `logprobs=True, top_logprobs=K`
and `max_tokens=1` in the request body (ChatOpenAI renames its own max_tokens to
max_completion_tokens, which llama.cpp's server ignores). The logprobs come back in
`AIMessage.response_metadata["logprobs"]` as OpenAI's `{"content": [{"token", "logprob",
"top_logprobs": [{"token", "logprob"}, ...]}]}`; the same client works for:

* the bundled llama.cpp server (llama_cpp.server 0.3.x): chat logprobs are supported (the server's
  default `logits_all=True`); it returns the K best tokens plus the sampled one, as detokenised text.
* vLLM: `top_logprobs` may not exceed the server's `--max-logprobs` (default 20); a larger K is
  refused with HTTP 400 (mapped to LLMUnavailable("http_error")). Start vLLM with
  `--max-logprobs N` to ask for more.

Failures are mapped by type with agent.llm.map_error (LLMUnavailable: timeout | connection |
http_error); a response without usable logprobs is LLMOutputInvalid("no_logprobs"), never an empty
answer. The per-call timeout is enforced with asyncio.wait_for.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx
import openai
from langchain_core.messages import AIMessage, BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from kernel.errors import LLMOutputInvalid, LLMUnavailable

from .llm import Message, map_error

logger = logging.getLogger(__name__)

NO_LOGPROBS = "no_logprobs"  # LLMOutputInvalid.reason: the answer carried no usable first-token logprobs


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The first generated position of a one-token answer: its text and the top-K alternatives."""

    text: str
    top: dict[str, float]  # token text -> logprob (natural log), as the server returned them
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    model: str


@runtime_checkable
class LogprobLLMLike(Protocol):
    """What the scorer needs from a client; fakes implement this too."""

    @property
    def model(self) -> str: ...

    async def afirst_token(
        self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float
    ) -> FirstToken: ...


def first_token(metadata: dict[str, Any], *, text: str = "") -> dict[str, float]:
    """The top logprobs of the first generated token from `response_metadata`; LLMOutputInvalid if absent."""
    logprobs = metadata.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        raise LLMOutputInvalid(NO_LOGPROBS, raw=text, detail="the response has no logprobs.content")
    first = content[0]
    top: dict[str, float] = {}
    for item in first.get("top_logprobs") or []:
        token, logprob = (item.get("token"), item.get("logprob")) if isinstance(item, dict) else (None, None)
        if isinstance(token, str) and isinstance(logprob, (int, float)) and logprob == logprob and logprob <= 0:
            top[token] = max(float(logprob), top.get(token, float("-inf")))
    if not top:
        raise LLMOutputInvalid(NO_LOGPROBS, raw=text, detail="the first token has no top_logprobs")
    return top


class LogprobChatLLM:
    """One-token chat completions with top logprobs on an OpenAI-compatible server (vLLM, llama.cpp)."""

    def __init__(self, *, base_url: str, model: str, api_key: str = "not-needed", timeout_s: float = 30.0):
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._model = model
        self._options: dict[str, Any] = {
            "base_url": base_url,
            "model": model,
            "api_key": SecretStr(api_key),
            "temperature": 0.0,
            "timeout": timeout_s,
            "max_retries": 0,
        }
        # One async client per event loop (a pooled connection from a closed loop fails), and its HTTP client.
        self._chats: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChatOpenAI] = weakref.WeakKeyDictionary()
        self._http: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
        self.clients_opened = self.clients_closed = 0  # HTTP clients made (one per event loop) and closed

    @property
    def model(self) -> str:
        return self._model

    def _chat(self) -> ChatOpenAI:
        loop = asyncio.get_running_loop()
        chat = self._chats.get(loop)
        if chat is None:
            http = openai.DefaultAsyncHttpxClient()
            chat = ChatOpenAI(**self._options, http_async_client=http)
            self._chats[loop], self._http[loop] = chat, http
            self.clients_opened += 1
        return chat

    async def aclose(self) -> None:
        """Close the running loop's HTTP client (its pooled connections) and forget it; call it in the loop
        that made the calls, before that loop ends (`async with`). A later call opens a new client."""
        loop = asyncio.get_running_loop()
        self._chats.pop(loop, None)
        http = self._http.pop(loop, None)
        if http is not None:
            await http.aclose()
            self.clients_closed += 1

    def close(self) -> None:
        """Close the HTTP clients of loops that are open and not running; forget every client. A client
        whose loop has ended cannot be closed any more (its sockets belong to that loop): use `aclose`."""
        for loop, http in list(self._http.items()):
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(http.aclose())
                self.clients_closed += 1
            elif not http.is_closed:
                logger.warning("logprob llm client not closed in its event loop", extra={"model": self._model})
        self._chats.clear()
        self._http.clear()

    async def __aenter__(self) -> LogprobChatLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        budget = min(timeout_s, self.timeout_s)
        if budget <= 0:
            raise LLMUnavailable("timeout", "no time left before the deadline")
        bound = self._chat().bind(logprobs=True, top_logprobs=top_logprobs)
        started = time.perf_counter()
        try:
            msg: BaseMessage = await asyncio.wait_for(
                bound.ainvoke(list(messages), extra_body={"max_tokens": 1}, timeout=budget), timeout=budget
            )
        except Exception as exc:  # noqa: BLE001 - mapped by type, unknown types re-raised
            mapped = map_error(exc)
            if mapped is None and isinstance(exc, ValueError):
                # langchain_openai raises a plain ValueError for a 200 whose body is not a chat completion
                # (a gateway's HTML page): the server is not an LLM server, whatever the status says.
                mapped = LLMUnavailable("http_error", "the response is not a chat completion")
            if mapped is None:
                raise
            logger.warning("logprob llm unavailable", extra={"model": self._model, "reason": mapped.reason})
            raise mapped from exc
        latency_ms = (time.perf_counter() - started) * 1000
        usage = msg.usage_metadata if isinstance(msg, AIMessage) else None
        meta = msg.response_metadata or {}
        return FirstToken(
            text=msg.text,
            top=first_token(meta, text=msg.text),
            prompt_tokens=usage["input_tokens"] if usage else None,
            completion_tokens=usage["output_tokens"] if usage else None,
            latency_ms=latency_ms,
            model=meta.get("model_name") or self._model,
        )
