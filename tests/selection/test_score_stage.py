"""The pipeline's scoring-mode LLM stage: parse failures are counted (never a silent zero), the averaged
log-probability enters fusion only through its weight, the candidate count is bounded by top_logprobs.

The LLM is a fake here only where a real one cannot be made to answer garbage on purpose; the real
server's path is tests/server/test_score_mode.py."""
from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import replace

import pytest

from agent.copy_cache import BackgroundCopier, CopyRewriter
from agent.llm import Message
from agent.logprob_llm import FirstToken
from agent.prompts import PromptRegistry
from agent.scorer import LLMScorer, canonical_order
from kernel.errors import ConfigError
from kernel.settings import Settings
from kernel.types import LLMResult, SelectRequest
from selection.fusion import FusionModel
from tests.utils.fakes import FakeQueueLLM

SETTINGS = Settings(_env_file=None)
PROMPT = PromptRegistry(SETTINGS.prompts_dir).get("score")
COPY_PROMPT = PromptRegistry(SETTINGS.prompts_dir).get("copy")
RUN_HISTORY = ["run-001", "run-004", "run-009"]
LABELLED = {"C": math.log(0.9), "A": math.log(0.05), "B": math.log(0.03), "The": math.log(0.01)}
GARBAGE = {"The": -0.1, "I": -2.0, "a": -3.0}  # no label at all (lower-case "a" is not label "A")


class FakeScriptedTopLLM:
    """Answers the i-th call with `tops[i]` (the last one repeated): a model that can be made to answer garbage."""

    model = "fake-scripted"

    def __init__(self, *tops: dict[str, float]):
        self.tops, self.calls = tops, 0

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        top = self.tops[min(self.calls, len(self.tops) - 1)]
        self.calls += 1
        return FirstToken(text=next(iter(top)), top=top, prompt_tokens=100, completion_tokens=1, latency_ms=1.0, model=self.model)


def select(selector, **fields):
    req = SelectRequest(user_id=f"u-{uuid.uuid4().hex}", history=RUN_HISTORY, k=3, deadline_ms=10000, **fields)
    return asyncio.run(selector.aselect(req))


def score_selector(demo_services, llm, *, permutations: int, llm_score_coef: float = 0.0):
    base = demo_services.selector
    fusion = replace(base.fusion, llm_score_coef=llm_score_coef)
    scorer = LLMScorer(llm, PROMPT, permutations=permutations, max_candidates=6)
    return replace(base, llm_mode="score", scorer=scorer, fusion=fusion, rank_by="relevance", llm_max_candidates=6, arm_policies={})


def test_one_permutation_without_a_label_is_counted_and_the_other_is_used(demo_services) -> None:
    llm = FakeScriptedTopLLM(LABELLED, GARBAGE)
    d = select(score_selector(demo_services, llm, permutations=2))
    assert llm.calls == 2
    assert (d.llm_used, d.degraded) == (True, False)
    assert d.usage["llm_calls"] == 2 and d.usage["score_failed_calls"] == 1
    assert d.usage["score_missing_labels"] == 3  # six labels shown, three in the answered call's top: floored, counted


def test_no_label_in_any_permutation_degrades_as_invalid_output(demo_services) -> None:
    llm = FakeScriptedTopLLM(GARBAGE)
    d = select(score_selector(demo_services, llm, permutations=2))
    assert (d.llm_used, d.degraded, d.degraded_reason) == (False, True, "llm_invalid_output")
    assert d.prompt is not None and d.prompt["name"] == "score"


def test_the_averaged_logprob_moves_the_ranking_only_through_its_weight(demo_services) -> None:
    prior_order = select(score_selector(demo_services, FakeScriptedTopLLM(LABELLED), permutations=1), use_llm=False).ranking
    unweighted = select(score_selector(demo_services, FakeScriptedTopLLM(LABELLED), permutations=1))
    weighted = select(score_selector(demo_services, FakeScriptedTopLLM(LABELLED), permutations=1, llm_score_coef=100.0), request_id="r-1")
    assert unweighted.llm_used and weighted.llm_used
    assert unweighted.ranking[:6] == prior_order[:6]  # weight 0 (the shipped weights): the LLM cannot move the ranking
    sent = prior_order[:6]  # the first six by prior, shown in the scorer's canonical order for this request id
    assert weighted.ranking[0] == sent[canonical_order(sent, seed_key="r-1")[2]]  # label C = the third shown, now first


def test_more_candidates_than_top_logprobs_is_refused_at_construction() -> None:
    with pytest.raises(ConfigError):
        LLMScorer(FakeScriptedTopLLM(LABELLED), PROMPT, max_candidates=21, top_logprobs=20)


def test_weights_file_round_trips_the_scoring_weight_and_keeps_old_hashes(tmp_path) -> None:
    m = FusionModel.hand_tuned()
    assert "llm_score_coef" not in m.to_json()  # unset: the file (and its weights_version) is what it was
    m.llm_score_coef = 0.25
    m.save(tmp_path / "w.json")
    assert FusionModel.load(tmp_path / "w.json").llm_score_coef == 0.25


class FakeRecordingReranker:
    """A listwise stage that ranks in the order it is given and records whether it was asked for copy."""

    model = "fake-recording"
    prompt_info = {"name": "rerank", "version": "1", "sha256": "0" * 64}

    def __init__(self) -> None:
        self.rewrite_asked: list[bool] = []

    async def arerank(self, *, candidates, rewrite: bool, **_: object) -> LLMResult:
        self.rewrite_asked.append(rewrite)
        return LLMResult(ranking=[c.ad.ad_id for c in candidates], justification=None, copy=None, raw="")


def test_listwise_with_a_copier_asks_no_inline_copy_and_serves_the_cached_rewrite(demo_services) -> None:
    base = replace(demo_services.selector, rank_by="relevance", arm_policies={}, llm_max_candidates=6)
    top = select(base, use_llm=False).ads[0].ad
    rewrite = {"headline": top.title.split(" | ")[0][:30], "description": top.text.split(":")[0][:90]}
    llm = FakeQueueLLM().enqueue(json.dumps(rewrite))
    copier = BackgroundCopier(rewriter=CopyRewriter(llm, COPY_PROMPT), validate=lambda c, ad: [str(r) for r in base.reviewer.check_copy(c, ad)])
    reranker = FakeRecordingReranker()
    sel = replace(base, reranker=reranker, copier=copier)

    async def run():
        history = RUN_HISTORY
        first = await sel.aselect(SelectRequest(user_id=f"u-{uuid.uuid4().hex}", history=history, k=3, deadline_ms=10000))
        await copier.drain()
        second = await sel.aselect(SelectRequest(user_id=f"u-{uuid.uuid4().hex}", history=history, k=3, deadline_ms=10000))
        await copier.aclose()
        return first, second

    first, second = asyncio.run(run())
    assert reranker.rewrite_asked == [False, False]  # the copy comes from the cache, not the ranking call
    assert first.ads[0].ad.ad_id == top.ad_id and first.ads[0].copy == first.ads[0].original
    assert second.ads[0].copy.headline == rewrite["headline"] and len(llm.calls) == 1
    assert copier.snapshot()["hits"] == 1
