from __future__ import annotations

import asyncio
import json
import time

import httpx2
import openai
import pytest

from kernel.errors import LLMUnavailable
from kernel.settings import Settings
from agent.llm import ChatLLM, ChatLLMLike, map_error, response_format
from agent.local_server import free_port
from agent.schema import build_output_schema, parse_llm_output
from tests.utils.fakes import FakeHangingLLMServer, FakeQueueLLM

MODEL = Settings(_env_file=None).llm_model
IDS = ["N1", "N2", "N3"]
MESSAGES = [
    {"role": "system", "content": "Rank the ads for the user. Reply with JSON."},
    {"role": "user", "content": "History: «football». Candidates: N1 «Pizza», N2 «Season tickets», N3 «Snow tires»."},
]
TIMEOUT_MARGIN_S = 1.0  # far below the 30 s a call without the deadline would take; above scheduling noise


def complete(llm: ChatLLM, *args: object, **kwargs: object):
    return asyncio.run(llm.acomplete(*args, **kwargs))  # type: ignore[arg-type]


def llm_at(url: str, **options: object) -> ChatLLM:
    return ChatLLM(base_url=url, model=MODEL, **options)  # type: ignore[arg-type]


# --- without a server --------------------------------------------------------------------------


def test_response_format_per_mode() -> None:
    schema = build_output_schema(IDS)
    assert response_format("json_object", schema) == {"type": "json_object", "schema": schema}
    assert response_format("json_schema", schema) == {
        "type": "json_schema",
        "json_schema": {"name": "ad_selection", "schema": schema, "strict": True},
    }


def test_errors_are_mapped_by_type_not_text() -> None:
    request = httpx2.Request("POST", "http://x/v1/chat/completions")
    response = httpx2.Response(503, request=request)
    assert map_error(openai.APITimeoutError(request=request)).reason == "timeout"  # type: ignore[union-attr]
    assert map_error(openai.APIConnectionError(request=request)).reason == "connection"  # type: ignore[union-attr]
    status = openai.APIStatusError("timeout connection refused", response=response, body=None)
    assert map_error(status).reason == "http_error"  # type: ignore[union-attr]
    assert map_error(httpx2.ReadTimeout("x", request=request)).reason == "timeout"  # type: ignore[union-attr]
    assert map_error(httpx2.ConnectError("x", request=request)).reason == "connection"  # type: ignore[union-attr]
    assert map_error(ValueError("timeout")) is None  # a bug is not an outage, whatever its message says


def test_from_settings_needs_a_url() -> None:
    with pytest.raises(ValueError, match="no LLM URL"):
        ChatLLM.from_settings(Settings(_env_file=None))
    llm = ChatLLM.from_settings(Settings(_env_file=None, llm_structured="json_schema"), base_url="http://127.0.0.1:1/v1")
    assert llm.structured == "json_schema" and llm.model == MODEL and llm.timeout_s == 30.0


def test_fakes_satisfy_the_protocol() -> None:
    assert isinstance(FakeQueueLLM(), ChatLLMLike)
    assert isinstance(llm_at("http://127.0.0.1:1/v1"), ChatLLMLike)


def test_no_time_left_fails_fast() -> None:
    with pytest.raises(LLMUnavailable) as exc:
        complete(llm_at("http://127.0.0.1:1/v1"), MESSAGES, schema=build_output_schema(IDS), timeout_s=0)
    assert exc.value.reason == "timeout"


def test_connection_refused_is_connection() -> None:
    llm = llm_at(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(LLMUnavailable) as exc:
        complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=5)
    assert exc.value.reason == "connection"


def test_hanging_server_times_out_on_time() -> None:
    timeout_s = 0.5
    with FakeHangingLLMServer() as server:
        llm = llm_at(server.base_url, timeout_s=30.0)
        started = time.perf_counter()
        with pytest.raises(LLMUnavailable) as exc:
            complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=timeout_s)
        elapsed = time.perf_counter() - started
        assert server.connections, "the request never reached the fake server"
    assert exc.value.reason == "timeout"
    assert timeout_s <= elapsed + 0.05 and elapsed < timeout_s + TIMEOUT_MARGIN_S


def test_ceiling_cuts_a_longer_deadline() -> None:
    with FakeHangingLLMServer() as server:
        llm = llm_at(server.base_url, timeout_s=0.3)
        started = time.perf_counter()
        with pytest.raises(LLMUnavailable):
            complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=60)
        assert time.perf_counter() - started < 0.3 + TIMEOUT_MARGIN_S


# --- against the real llama.cpp server (SmolLM2) -----------------------------------------------

real_server = pytest.mark.llm_server


@real_server
def test_json_object_mode_returns_schema_valid_json(local_llm_url: str) -> None:
    llm = llm_at(local_llm_url, structured="json_object")
    out = complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=60)
    data = json.loads(out.text)  # grammar-constrained: plain JSON, no fences
    assert set(data) == {"ranking", "justification", "headline", "description"}
    assert set(data["ranking"]) <= set(IDS)
    assert len(data["headline"]) <= 30 and len(data["description"]) <= 90
    parse_llm_output(out.text, IDS)
    assert out.prompt_tokens and out.completion_tokens and out.latency_ms > 0
    assert out.model == MODEL and out.finish_reason == "stop"


@real_server
def test_json_object_mode_async(local_llm_url: str) -> None:
    llm = llm_at(local_llm_url)
    out = asyncio.run(llm.acomplete(MESSAGES, schema=build_output_schema(IDS, rewrite=False), timeout_s=60))
    assert set(json.loads(out.text)) == {"ranking", "justification"}


@real_server
def test_json_schema_mode_is_an_http_error_on_llama_cpp(local_llm_url: str) -> None:
    # llama-cpp-python's server only knows response_format types "text" and "json_object"; its request
    # validation error comes back as HTTP 500 (not 422).
    llm = llm_at(local_llm_url, structured="json_schema")
    with pytest.raises(LLMUnavailable) as exc:
        complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=60)
    assert exc.value.reason == "http_error"
    assert "500" in str(exc.value)


@real_server
def test_max_tokens_is_honoured(local_llm_url: str) -> None:
    llm = llm_at(local_llm_url, max_tokens=8)
    out = complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=60)
    assert out.completion_tokens is not None and out.completion_tokens <= 8
    assert out.finish_reason == "length"


@real_server
def test_real_server_timeout(local_llm_url: str) -> None:
    llm = llm_at(local_llm_url, max_tokens=16)  # the abandoned generation stays short
    started = time.perf_counter()
    with pytest.raises(LLMUnavailable) as exc:
        complete(llm, MESSAGES, schema=build_output_schema(IDS), timeout_s=0.05)
    assert exc.value.reason == "timeout"
    assert time.perf_counter() - started < 0.05 + TIMEOUT_MARGIN_S


@real_server
def test_async_works_across_event_loops(local_llm_url: str) -> None:
    # The eval harness and tests call asyncio.run repeatedly; a pooled connection from a closed loop
    # must not be reused (langchain-openai's shared default client fails with "Event loop is closed").
    llm = llm_at(local_llm_url, max_tokens=8)
    schema = build_output_schema(IDS)

    async def two_at_once() -> list[object]:
        return list(await asyncio.gather(*(llm.acomplete(MESSAGES, schema=schema, timeout_s=60) for _ in range(2))))

    for _ in range(2):
        assert len(asyncio.run(two_at_once())) == 2
    assert complete(llm_at(local_llm_url, max_tokens=8), MESSAGES, schema=schema, timeout_s=60).completion_tokens
