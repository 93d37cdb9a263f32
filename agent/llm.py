"""The chat client: one OpenAI-compatible endpoint (vLLM, llama.cpp's server) behind a small interface.

`ChatLLM` wraps langchain_openai.ChatOpenAI with SDK retries off (a retry would multiply the
deadline). `response_format` and `max_tokens` go in the request body (`extra_body`): LangChain then
uses its plain `chat.completions.create` path (a `response_format` kwarg would route through the
SDK's `.parse()`, which raises on finish_reason="length" and drops the raw text), and llama.cpp
sees `max_tokens` (ChatOpenAI sends `max_completion_tokens`, which llama.cpp ignores). The per-call
timeout is passed to that call *and* enforced as a wall-clock cutoff: `acomplete` (the one call; the
server, the CLI and the eval harness all await it) cancels the in-flight request at the deadline with
`asyncio.wait_for`.

Failures are mapped by exception type, never by message text, to LLMUnavailable(reason=timeout |
connection | http_error); any other exception is re-raised as it is (the pipeline's LLM admission
turns it into `llm_error`). Anything implementing `ChatLLMLike` (tests' fakes) can replace it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, assert_never, runtime_checkable

import httpx
import openai
from langchain_core.messages import AIMessage, BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from kernel.errors import LLMUnavailable

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

Message: TypeAlias = dict[str, str] | BaseMessage
StructuredMode: TypeAlias = Literal["json_schema", "json_object"]
SCHEMA_NAME = "ad_selection"

# openai>=3 talks through httpx2; older SDKs through httpx. Map whichever leaks out of either.
try:  # pragma: no cover - depends on the installed SDK
    import httpx2

    _HTTPX = (httpx, httpx2)
except ImportError:  # pragma: no cover
    _HTTPX = (httpx,)
_TIMEOUTS: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncio.TimeoutError,
    openai.APITimeoutError,
    *(m.TimeoutException for m in _HTTPX),
)
_CONNECTION: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,
    *(m.TransportError for m in _HTTPX),
)
_HTTP: tuple[type[BaseException], ...] = (
    openai.APIStatusError,
    openai.APIResponseValidationError,
    *(m.HTTPStatusError for m in _HTTPX),
)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    model: str
    finish_reason: str | None = None  # "length" = cut by max_tokens


@runtime_checkable
class ChatLLMLike(Protocol):
    """What the reranker needs from an LLM client; fakes implement this too."""

    @property
    def model(self) -> str: ...

    async def acomplete(
        self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float
    ) -> Completion: ...


def response_format(mode: StructuredMode, schema: dict[str, Any]) -> dict[str, Any]:
    """The `response_format` body field for a structured-output mode."""
    if mode == "json_schema":  # OpenAI / vLLM structured outputs
        return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}
    if mode == "json_object":  # llama.cpp servers: JSON mode constrained by a grammar built from `schema`
        return {"type": "json_object", "schema": schema}
    assert_never(mode)


def map_error(exc: BaseException) -> LLMUnavailable | None:
    """LLMUnavailable for a transport/HTTP failure, chosen by the exception's type; None for anything else."""
    if isinstance(exc, LLMUnavailable):
        return exc
    if isinstance(exc, _TIMEOUTS):  # before _CONNECTION: APITimeoutError subclasses APIConnectionError
        return LLMUnavailable("timeout", type(exc).__name__)
    if isinstance(exc, _HTTP):
        status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", "")
        return LLMUnavailable("http_error", f"{type(exc).__name__} {status}".strip())
    if isinstance(exc, _CONNECTION):
        return LLMUnavailable("connection", type(exc).__name__)
    return None


class ChatLLM:
    """A chat model on an OpenAI-compatible server, with a hard per-call deadline."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "not-needed",
        structured: StructuredMode = "json_object",
        temperature: float = 0.0,
        max_tokens: int = 256,
        timeout_s: float = 30.0,
    ):
        self.base_url = base_url
        self.structured: StructuredMode = structured
        self.timeout_s = timeout_s  # ceiling for any call; each call passes its remaining deadline
        self.max_tokens = max_tokens
        self._model = model
        self._options: dict[str, Any] = {
            "base_url": base_url,
            "model": model,
            "api_key": SecretStr(api_key),
            "temperature": temperature,
            "timeout": timeout_s,
            "max_retries": 0,
        }
        ChatOpenAI(**self._options)  # validates the options now, and pays the client's first-use cost at start-up
        # One async client per event loop: langchain-openai caches its default async httpx client
        # process-wide, and a pooled connection from a closed loop fails with "Event loop is closed".
        self._async_chats: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChatOpenAI] = weakref.WeakKeyDictionary()

    @classmethod
    def from_settings(cls, settings: Settings, *, base_url: str | None = None) -> ChatLLM:
        """From settings; `base_url` (e.g. a started LocalLLMServer's) wins over settings.llm_url."""
        url = base_url or settings.llm_url
        if not url:
            raise ValueError("no LLM URL: set ADSELECT_LLM_URL or pass the local server's base_url")
        return cls(
            base_url=url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            structured=settings.llm_structured,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            timeout_s=settings.llm_timeout_s,
        )

    @property
    def model(self) -> str:
        return self._model

    def _async_chat(self) -> ChatOpenAI:
        loop = asyncio.get_running_loop()
        chat = self._async_chats.get(loop)
        if chat is None:
            chat = ChatOpenAI(**self._options, http_async_client=openai.DefaultAsyncHttpxClient())
            self._async_chats[loop] = chat
        return chat

    def close(self) -> None:
        """Forget the per-loop clients (their connections close with their event loops)."""
        self._async_chats.clear()

    def __enter__(self) -> ChatLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _budget(self, timeout_s: float) -> float:
        budget = min(timeout_s, self.timeout_s)
        if budget <= 0:
            raise LLMUnavailable("timeout", "no time left before the deadline")
        return budget

    def _call_kwargs(self, schema: dict[str, Any], budget: float) -> dict[str, Any]:
        # `max_tokens` travels in the body: ChatOpenAI renames its own max_tokens to max_completion_tokens,
        # which llama.cpp's server ignores (it then generates up to the context size).
        body = {"response_format": response_format(self.structured, schema), "max_tokens": self.max_tokens}
        return {"extra_body": body, "timeout": budget}

    def _completion(self, msg: BaseMessage, started: float) -> Completion:
        latency_ms = (time.perf_counter() - started) * 1000
        usage = msg.usage_metadata if isinstance(msg, AIMessage) else None
        meta = msg.response_metadata or {}
        out = Completion(
            text=msg.text,
            prompt_tokens=usage["input_tokens"] if usage else None,
            completion_tokens=usage["output_tokens"] if usage else None,
            latency_ms=latency_ms,
            model=meta.get("model_name") or self._model,
            finish_reason=meta.get("finish_reason"),
        )
        logger.debug(
            "llm call",
            extra={
                "model": out.model,
                "latency_ms": round(latency_ms, 1),
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "finish_reason": out.finish_reason,
            },
        )
        return out

    def _fail(self, exc: BaseException, started: float) -> LLMUnavailable:
        mapped = map_error(exc)
        if mapped is None:
            raise exc
        logger.warning(
            "llm unavailable",
            extra={
                "model": self._model,
                "reason": mapped.reason,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return mapped

    async def acomplete(
        self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float
    ) -> Completion:
        """Async call; cancelled at `timeout_s`."""
        budget = self._budget(timeout_s)
        started = time.perf_counter()
        try:
            msg = await asyncio.wait_for(
                self._async_chat().ainvoke(list(messages), **self._call_kwargs(schema, budget)), timeout=budget
            )
        except Exception as exc:  # noqa: BLE001 - mapped by type, unknown types re-raised
            raise self._fail(exc, started) from exc
        return self._completion(msg, started)
