from __future__ import annotations

import asyncio
import json

import pytest

from kernel.errors import LLMOutputInvalid, LLMUnavailable, PromptError
from kernel.settings import REPO_ROOT, Settings
from kernel.types import Ad, Candidate, Copy
from agent.llm import ChatLLM
from agent.prompts import PromptRegistry, PromptTemplate
from agent.reranker import LLMReranker
from tests.agent.conftest import make_ads, make_candidates
from tests.utils.fakes import FakeGarbageLLM, FakeQueueLLM

EVENTS = ["searched for football tickets"]


@pytest.fixture
def prompt() -> PromptTemplate:
    return PromptRegistry(REPO_ROOT / "prompts").get("rerank")


def answer(ranking: list[str], **over: object) -> str:
    return json.dumps(
        {
            "ranking": ranking,
            "justification": "You follow football; these are tickets.",
            "headline": "Home games, fair prices",
            "description": "Season tickets for the last six home games.",
            **over,
        }
    )


def rerank(reranker: LLMReranker, history_ads: list[Ad], candidates: list[Candidate], **over: object):
    kwargs: dict[str, object] = {
        "history_ads": history_ads, "events": EVENTS, "candidates": candidates, "timeout_s": 5.0, "rewrite": True,
    }  # fmt: skip
    return asyncio.run(reranker.arerank(**{**kwargs, **over}))  # type: ignore[arg-type]


def test_result_from_a_valid_answer(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer([ids[2], ids[0]]))
    result = rerank(LLMReranker(llm, prompt), history_ads, candidates)
    assert result.ranking == [ids[2], ids[0]]
    assert result.copy == Copy(headline="Home games, fair prices", description="Season tickets for the last six home games.")
    assert result.justification and result.raw.startswith("{")
    call = llm.calls[0]
    assert call["timeout_s"] == 5.0
    assert call["schema"]["properties"]["ranking"]["items"]["enum"] == ids
    system, user = call["messages"]
    assert f"«{history_ads[0].title}»" in user["content"] and "«searched for football tickets»" in user["content"]


def test_only_candidate_ids_come_back(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer(["N99999", ids[1], ids[1], history_ads[0].ad_id, ids[3]]))
    result = rerank(LLMReranker(llm, prompt), history_ads, candidates)
    assert result.ranking == [ids[1], ids[3]]
    # Copy and justification were asked for the target (by default the first candidate sent), not for
    # whatever the model ranks first: a foreign first id does not void them.
    assert result.copy_for == ids[0] and result.copy is not None


def test_copy_is_written_for_the_named_target(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer([ids[2], ids[0]]))
    result = rerank(LLMReranker(llm, prompt), history_ads, candidates, target_id=ids[3])
    assert result.copy_for == ids[3] and result.ranking == [ids[2], ids[0]]
    assert f"Target ad: {ids[3]}" in llm.calls[0]["messages"][1]["content"]


def test_max_candidates_cuts_what_is_sent(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer([ids[7], ids[1]]))  # ids[7] was not sent
    result = rerank(LLMReranker(llm, prompt, max_candidates=5, max_ranked=3), history_ads, candidates)
    assert result.ranking == [ids[1]]
    ranking_schema = llm.calls[0]["schema"]["properties"]["ranking"]
    assert ranking_schema["items"]["enum"] == ids[:5] and ranking_schema["maxItems"] == 3


def test_alias_ids_are_mapped_back(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer(["3", "1", "77"]))
    result = rerank(LLMReranker(llm, prompt, alias_ids=True), history_ads, candidates)
    assert result.ranking == [ids[2], ids[0]]
    user = llm.calls[0]["messages"][1]["content"]
    assert f"\n1 «{candidates[0].ad.title}»" in user and ids[0] not in user


def test_text_is_clipped_and_title_repeats_skipped(prompt, history_ads) -> None:
    ads = [
        Ad(ad_id="A1", title="Snow tires", text="Winter grip " * 20),
        Ad(ad_id="A2", title="Pizza night", text="Pizza night"),
    ]
    llm = FakeQueueLLM().enqueue(answer(["A1"]))
    rerank(LLMReranker(llm, prompt, max_text_chars=20), history_ads, make_candidates(ads))
    lines = llm.calls[0]["messages"][1]["content"].splitlines()
    assert "A1 «Snow tires» «Winter grip Winter…»" in lines and "A2 «Pizza night»" in lines


def test_without_rewrite_no_copy_is_asked(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(json.dumps({"ranking": [ids[0]], "justification": "fits"}))
    result = rerank(LLMReranker(llm, prompt), history_ads, candidates, rewrite=False)
    assert result.ranking == [ids[0]] and result.copy is None
    assert "headline" not in llm.calls[0]["schema"]["properties"]


def test_garbage_raises_output_invalid(prompt, history_ads, candidates) -> None:
    with pytest.raises(LLMOutputInvalid) as exc:
        rerank(LLMReranker(FakeGarbageLLM(), prompt), history_ads, candidates)
    assert exc.value.reason == "malformed_json" and exc.value.raw


def test_cut_output_is_reported_as_truncated(prompt, history_ads, candidates) -> None:
    llm = FakeQueueLLM(finish_reason="length").enqueue('{"ranking": ["N1')
    with pytest.raises(LLMOutputInvalid) as exc:
        rerank(LLMReranker(llm, prompt), history_ads, candidates)
    assert exc.value.reason == "truncated"


def test_unavailable_propagates(prompt, history_ads, candidates) -> None:
    llm = FakeQueueLLM().enqueue(LLMUnavailable("timeout"))
    with pytest.raises(LLMUnavailable):
        rerank(LLMReranker(llm, prompt), history_ads, candidates)


def test_async_rerank(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    llm = FakeQueueLLM().enqueue(answer([ids[4]]))
    result = asyncio.run(
        LLMReranker(llm, prompt).arerank(history_ads=history_ads, events=[], candidates=candidates, timeout_s=1.0, rewrite=True)
    )
    assert result.ranking == [ids[4]]


def test_prompt_must_declare_the_reranker_variables(tmp_path, prompt) -> None:
    (tmp_path / "other.yaml").write_text("name: other\nversion: 1\nvariables: [x]\nsystem: s\nuser: '{{ x }}'\n")
    with pytest.raises(PromptError, match="reranker fills"):
        LLMReranker(FakeQueueLLM(), PromptTemplate.from_file(tmp_path / "other.yaml"))


def test_from_settings_uses_the_named_prompt() -> None:
    settings = Settings(_env_file=None, llm_max_candidates=7, llm_max_ranked=4, llm_alias_ids=True)
    reranker = LLMReranker.from_settings(settings, FakeQueueLLM())
    assert reranker.prompt.name == settings.prompt_name
    assert (reranker.max_candidates, reranker.max_ranked, reranker.alias_ids) == (7, 4, True)


def test_empty_candidates_rejected(prompt, history_ads) -> None:
    with pytest.raises(ValueError):
        rerank(LLMReranker(FakeQueueLLM(), prompt), history_ads, [])


# --- against the real llama.cpp server (SmolLM2) -----------------------------------------------


@pytest.mark.llm_server
def test_real_rerank_returns_only_candidate_ids(local_llm_url: str, prompt, history_ads) -> None:
    candidates = make_candidates(make_ads()[1:6])
    ids = {c.ad.ad_id for c in candidates}
    llm = ChatLLM.from_settings(Settings(_env_file=None), base_url=local_llm_url)
    result = rerank(LLMReranker(llm, prompt), history_ads, candidates, timeout_s=60.0)
    assert result.ranking and set(result.ranking) <= ids
    assert len(result.ranking) == len(set(result.ranking))
    assert result.prompt_tokens and result.completion_tokens
    sent = json.loads(result.raw)  # what the server generated under the schema's limits, whatever was kept
    assert len(sent["headline"]) <= 30 and len(sent["description"]) <= 90
    assert result.copy is not None, (result.copy_rejected, result.refusals)
    assert 0 < len(result.copy.headline) <= 30 and 0 < len(result.copy.description) <= 90


@pytest.mark.llm_server
@pytest.mark.parametrize("alias_ids", [False, True])
def test_real_prompt_for_20_candidates_fits_the_budget(local_llm_url: str, prompt, history_ads, candidates, alias_ids) -> None:
    """Titles only, 3 history titles, 1 event, 20 candidates: at most 600 prompt tokens (chat template included)."""
    assert len(candidates) == 20
    llm = ChatLLM.from_settings(Settings(_env_file=None, llm_max_tokens=16), base_url=local_llm_url)
    reranker = LLMReranker(llm, prompt, max_text_chars=0, alias_ids=alias_ids)
    call = reranker.prepare(history_ads=history_ads, events=EVENTS, candidates=candidates, rewrite=True)
    out = asyncio.run(llm.acomplete(call.messages, schema=call.schema, timeout_s=120))
    assert out.prompt_tokens is not None and out.prompt_tokens <= 600, out.prompt_tokens


def test_text_that_repeats_the_instructions_is_not_copy(prompt, history_ads, candidates) -> None:
    ids = [c.ad.ad_id for c in candidates]
    echo = json.dumps({
        "ranking": [ids[0]], "justification": "One sentence tying the user's history to the target ad.",
        "headline": "A catchy title for the target", "description": "one line selling the target ad, up to 90 characters",
    })  # fmt: skip
    result = rerank(LLMReranker(FakeQueueLLM().enqueue(echo), prompt), history_ads, candidates)
    assert result.ranking == [ids[0]] and result.justification is None and result.copy is None
    assert result.refusals == ["justification_prompt_echo", "copy_prompt_echo"]
    fine = rerank(LLMReranker(FakeQueueLLM().enqueue(answer([ids[0]])), prompt), history_ads, candidates)
    assert fine.justification and fine.copy is not None  # ordinary copy shares no 4-word run with the prompt
