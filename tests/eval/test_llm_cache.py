from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kernel.errors import LLMUnavailable
from agent.llm import ChatLLMLike
from eval.llm_cache import CachingChatLLM, LLMCache
from tests.utils.fakes import FakeQueueLLM

SCHEMA = {"type": "object", "properties": {"ranking": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}}}}
ANSWER = json.dumps({"ranking": ["b", "a"], "justification": "x"})


def _messages(cands: str = "a b") -> list[dict[str, str]]:
    return [{"role": "system", "content": "rank"}, {"role": "user", "content": f"Candidates: {cands}"}]


def complete(llm: CachingChatLLM, *args, **kwargs):
    return asyncio.run(llm.acomplete(*args, **kwargs))


def _wrap(fake: FakeQueueLLM, path: Path, **decoding) -> CachingChatLLM:
    return CachingChatLLM(fake, LLMCache(path), prompt_sha256="p" * 64, decoding={"temperature": 0.0, **decoding})


def test_satisfies_the_chat_protocol(tmp_path: Path) -> None:
    assert isinstance(_wrap(FakeQueueLLM(), tmp_path / "c.sqlite"), ChatLLMLike)


def test_a_hit_costs_no_call(tmp_path: Path) -> None:
    fake = FakeQueueLLM().enqueue(ANSWER)  # one answer only: a second real call would fail
    llm = _wrap(fake, tmp_path / "c.sqlite")
    first = complete(llm, _messages(), schema=SCHEMA, timeout_s=1)
    second = complete(llm, _messages(), schema=SCHEMA, timeout_s=1)
    assert first.text == second.text == ANSWER
    assert len(fake.calls) == 1
    assert llm.stats.to_dict() == {"hits": 1, "misses": 1, "errors": 0, "hit_rate": 0.5}


def test_cache_survives_the_process_and_async_path_shares_it(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    complete(_wrap(FakeQueueLLM().enqueue(ANSWER), path), _messages(), schema=SCHEMA, timeout_s=1)
    fake = FakeQueueLLM()  # nothing queued: any real call raises
    again = _wrap(fake, path)
    got = asyncio.run(again.acomplete(_messages(), schema=SCHEMA, timeout_s=1))
    assert got.text == ANSWER and fake.calls == [] and again.stats.hits == 1


@pytest.mark.parametrize(
    "change",
    ["candidates", "decoding", "prompt", "model", "schema"],
)
def test_key_covers_prompt_model_decoding_and_candidate_list(tmp_path: Path, change: str) -> None:
    path = tmp_path / "c.sqlite"
    complete(_wrap(FakeQueueLLM().enqueue(ANSWER), path), _messages(), schema=SCHEMA, timeout_s=1)
    fake = FakeQueueLLM(model="other" if change == "model" else "fake-queue").enqueue(ANSWER)
    llm = _wrap(fake, path, **({"max_tokens": 99} if change == "decoding" else {}))
    if change == "prompt":
        llm.prompt_sha256 = "q" * 64
    messages = _messages("b a") if change == "candidates" else _messages()
    schema = {**SCHEMA, "required": ["ranking"]} if change == "schema" else SCHEMA
    complete(llm, messages, schema=schema, timeout_s=1)
    assert len(fake.calls) == 1 and llm.stats.misses == 1


def test_failures_are_not_cached(tmp_path: Path) -> None:
    fake = FakeQueueLLM().enqueue(LLMUnavailable("timeout"), ANSWER)
    llm = _wrap(fake, tmp_path / "c.sqlite")
    with pytest.raises(LLMUnavailable):
        complete(llm, _messages(), schema=SCHEMA, timeout_s=1)
    assert complete(llm, _messages(), schema=SCHEMA, timeout_s=1).text == ANSWER
    assert len(fake.calls) == 2 and llm.stats.errors == 1 and llm.stats.hits == 0
