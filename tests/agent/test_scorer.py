"""Scoring mode: letter labels, first-token logprobs, permutation averaging; the real bundled llama.cpp server."""
from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from agent.llm import Message
from agent.logprob_llm import NO_LOGPROBS, FirstToken, LogprobChatLLM, LogprobLLMLike
from agent.prompts import PromptRegistry
from agent.scorer import LABELS, NO_LABEL, LLMScorer, label_logprobs, permutations
from kernel.errors import LLMOutputInvalid, LLMUnavailable
from kernel.settings import Settings
from kernel.types import Ad, Candidate
from tests.utils.fake_http import FakeCannedLLMServer, chat_completion
from tests.utils.fakes import FakeHangingLLMServer

SETTINGS = Settings(_env_file=None)
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
PROMPT = PromptRegistry(SETTINGS.prompts_dir).get("score")
# Real-server tests use a 600 s deadline: the CPU is shared and the deadline is not what they test
# (llama.cpp serves one request at a time, so P concurrent calls wait for each other).


def scorer(llm: LogprobLLMLike, **options: object) -> LLMScorer:
    return LLMScorer.from_settings(SETTINGS, llm, **options)  # type: ignore[arg-type]


def as_candidates(ads: Sequence[Ad]) -> list[Candidate]:
    return [Candidate(ad=ad, priors={}) for ad in ads]


def demo_ads() -> dict[str, Ad]:
    rows = (json.loads(line) for line in (DEMO / "ads.jsonl").open(encoding="utf-8"))
    return {r["ad_id"]: Ad(ad_id=r["ad_id"], title=r["title"], text=r.get("text", ""), category=r["category"]) for r in rows}


def demo_impressions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DEMO / "impressions.jsonl").open(encoding="utf-8")]
    return [r for r in rows if r["candidates"] and r["history"]][:n]


class FakeTopLLM:
    """Answers every call with the same top logprobs (or raises the queued exception for the i-th call)."""

    model = "fake-top"

    def __init__(self, top: dict[str, float], errors: dict[int, BaseException] | None = None):
        self.top, self.errors, self.calls = top, errors or {}, 0

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        i, self.calls = self.calls, self.calls + 1
        if i in self.errors:
            raise self.errors[i]
        return FirstToken(text="A", top=self.top, prompt_tokens=100, completion_tokens=1, latency_ms=1.0, model=self.model)


# --- without a server ----------------------------------------------------------------------------


def test_label_logprobs_merge_spaces_floor_missing_and_normalise() -> None:
    top = {"A": math.log(0.5), " A": math.log(0.1), "B": math.log(0.2), "The": math.log(0.05)}
    got = label_logprobs(top, ["A", "B", "C"])
    assert got.missing == 1  # C is not in the top: floor = min(top) = log 0.05, counted
    p = {k: math.exp(v) for k, v in got.logprob.items()}
    assert sum(p.values()) == pytest.approx(1.0)
    assert p["A"] == pytest.approx(0.6 / 0.85) and p["C"] == pytest.approx(0.05 / 0.85)


def test_no_label_in_the_top_is_a_parse_failure_not_a_zero() -> None:
    with pytest.raises(LLMOutputInvalid) as exc:
        label_logprobs({"The": -0.1, "I": -2.0, "a": -3.0}, ["A", "B"])  # lower-case "a" is not label "A"
    assert exc.value.reason == NO_LABEL


def test_permutations_identity_reverse_then_seeded_shuffles() -> None:
    orders = permutations(5, 4, seed_key="imp-1")
    assert orders[0] == [0, 1, 2, 3, 4] and orders[1] == [4, 3, 2, 1, 0]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert orders == permutations(5, 4, seed_key="imp-1")
    assert orders[2:] != permutations(5, 4, seed_key="imp-2")[2:]


def test_prompt_layout_static_first_then_user_then_candidates() -> None:
    ads = list(demo_ads().values())
    calls = scorer(FakeTopLLM({"A": -0.1}), permutations=2).prepare(
        history_ads=ads[:2], events=[], candidates=as_candidates(ads[10:14]), seed_key="x"
    )
    a, b = calls
    assert a.messages[0] == b.messages[0]  # the system message is the same for every request
    user = a.messages[1]["content"]
    assert user.index(ads[0].title[:20]) < user.index(ads[10].title[:20])
    assert a.order == [ad.ad_id for ad in ads[10:14]] and b.order == a.order[::-1]
    assert f"A «{ads[10].title}»" in user and f"A «{ads[13].title}»" in b.messages[1]["content"]


def test_averaging_and_partial_failure() -> None:
    ads = list(demo_ads().values())[:3]
    top = {"A": math.log(0.7), "B": math.log(0.2), "C": math.log(0.1)}
    llm = FakeTopLLM(top, errors={2: LLMOutputInvalid(NO_LOGPROBS)})
    res = asyncio.run(scorer(llm, permutations=3).ascore(history_ads=[], events=[], candidates=as_candidates(ads), timeout_s=5))
    first, _, last = (ad.ad_id for ad in ads)
    # Shown first once (0.7) and last once (0.1): the mean log-probability of the two answered orders.
    assert res.logprob[first] == pytest.approx((math.log(0.7) + math.log(0.1)) / 2)
    assert res.logprob[first] == pytest.approx(res.logprob[last])
    assert res.position[first] == 1.0 and res.answered == 2 and res.failures == [NO_LOGPROBS]
    assert sum(res.prob.values()) == pytest.approx(1.0)
    # each answered order's position and log-probability is kept (the fit's position control), the failed one's is not
    lp = label_logprobs(top, ["A", "B", "C"]).logprob
    assert res.by_order == {first: [(0, lp["A"]), (2, lp["C"])], ads[1].ad_id: [(1, lp["B"])] * 2, last: [(2, lp["C"]), (0, lp["A"])]}


def test_all_permutations_failing_raises_the_typed_error() -> None:
    ads = list(demo_ads().values())[:3]
    llm = FakeTopLLM({}, errors={0: LLMUnavailable("timeout"), 1: LLMUnavailable("timeout")})
    with pytest.raises(LLMUnavailable):
        asyncio.run(scorer(llm, permutations=2).ascore(history_ads=[], events=[], candidates=as_candidates(ads), timeout_s=5))


def test_more_candidates_than_labels_is_refused() -> None:
    with pytest.raises(ValueError):
        scorer(FakeTopLLM({}), max_candidates=len(LABELS) + 1)


# --- garbage and hung servers on loopback ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "error", "reason"),
    [
        (chat_completion("A", logprobs=None), "application/json", LLMOutputInvalid, NO_LOGPROBS),
        (chat_completion("A", logprobs={"content": []}), "application/json", LLMOutputInvalid, NO_LOGPROBS),
        (chat_completion("A", logprobs={"content": [{"token": "A", "logprob": -0.1, "top_logprobs": []}]}),
         "application/json", LLMOutputInvalid, NO_LOGPROBS),
        (b"<html><body>502 Bad Gateway</body></html>", "text/html", LLMUnavailable, "http_error"),
    ],
)  # fmt: skip
def test_garbage_server_raises_typed_errors(body: bytes, content_type: str, error: type, reason: str) -> None:
    ads = list(demo_ads().values())[:3]
    with FakeCannedLLMServer(body=body, content_type=content_type) as server:
        llm = LogprobChatLLM(base_url=server.base_url, model=SETTINGS.llm_model, timeout_s=5)
        with pytest.raises(error) as exc:
            asyncio.run(scorer(llm).ascore(history_ads=[], events=[], candidates=as_candidates(ads), timeout_s=5))
        assert exc.value.reason == reason
        sent = server.requests[0]
        assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["top_logprobs"] == SETTINGS.score_top_logprobs


def test_hung_server_times_out() -> None:
    ads = list(demo_ads().values())[:3]
    with FakeHangingLLMServer() as server:
        llm = LogprobChatLLM(base_url=server.base_url, model=SETTINGS.llm_model, timeout_s=5)
        with pytest.raises(LLMUnavailable) as exc:
            asyncio.run(scorer(llm, permutations=2).ascore(history_ads=[], events=[], candidates=as_candidates(ads), timeout_s=0.5))
    assert exc.value.reason == "timeout"


# --- the real bundled llama.cpp server ---------------------------------------------------------


def test_every_label_is_one_token_in_smollm2(local_llm_url: str) -> None:
    root = local_llm_url.removesuffix("/v1")
    with httpx.Client(timeout=30) as http:
        for label in LABELS:
            for text in (label, f" {label}"):
                tokens = http.post(f"{root}/extras/tokenize", json={"input": text}).json()["tokens"]
                assert len(tokens) == 1, (text, tokens)


def test_real_server_one_token_per_call_and_a_probability_for_every_candidate(local_llm_url: str) -> None:
    ads = demo_ads()
    imp = demo_impressions(1)[0]
    llm = LogprobChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, timeout_s=600)
    res = asyncio.run(
        scorer(llm, permutations=2).ascore(
            history_ads=[ads[h] for h in imp["history"]], events=[], candidates=as_candidates([ads[c] for c in imp["candidates"]]),
            timeout_s=600, seed_key=imp["impression_id"],
        )
    )  # fmt: skip
    assert res.answered == 2 and res.failures == []
    assert res.completion_tokens == [1, 1]
    assert set(res.logprob) == set(imp["candidates"]) and all(math.isfinite(v) for v in res.logprob.values())
    assert sum(res.prob.values()) == pytest.approx(1.0)
    n = len(imp["candidates"])
    assert all(p == (n - 1) / 2 for p in res.position.values())  # shown once in order, once reversed


def test_real_server_valid_answer_rate_on_20_demo_impressions(local_llm_url: str) -> None:
    ads = demo_ads()
    llm = LogprobChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, timeout_s=600)
    s = scorer(llm, permutations=1)

    async def run() -> tuple[int, int, int]:
        valid = missing = asked = 0
        for imp in demo_impressions(20):
            try:
                res = await s.ascore(
                    history_ads=[ads[h] for h in imp["history"]], events=[],
                    candidates=as_candidates([ads[c] for c in imp["candidates"]]), timeout_s=600,
                    seed_key=imp["impression_id"],
                )  # fmt: skip
            except LLMOutputInvalid:
                continue
            assert res.completion_tokens == [1]
            valid += 1
            missing += res.missing_labels
            asked += len(res.candidate_ids)
        return valid, missing, asked

    valid, missing, asked = asyncio.run(run())
    assert valid / 20 >= 0.99, f"valid answers {valid}/20 (labels given the floor: {missing}/{asked})"
