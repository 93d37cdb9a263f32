"""Scoring mode: letter labels, first-token logprobs, permutation averaging; the real bundled llama.cpp server."""
from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from agent.llm import Message
from agent.logprob_llm import NO_LOGPROBS, FirstToken, LogprobChatLLM, LogprobLLMLike
from agent.prompts import PromptRegistry
from agent.scorer import ALL, LABELS, NO_LABEL, LLMScorer, canonical_order, label_logprobs, permutations
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


def ids_of(n: int) -> list[str]:
    return [f"ad-{i:02d}" for i in range(n)]


@pytest.mark.parametrize("n", range(1, 13))
def test_all_permutations_are_a_latin_square(n: int) -> None:
    orders = permutations(ids_of(n), ALL, seed_key="imp-1")
    assert len(orders) == n
    assert all(sorted(o) == list(range(n)) for o in orders)  # every order shows every candidate once
    assert all(sorted(o[pos] for o in orders) == list(range(n)) for pos in range(n))  # every candidate at every position once
    assert permutations(ids_of(n), n + 3, seed_key="imp-1") == orders  # P >= n means n: there are only n rotations


@pytest.mark.parametrize(("n", "p"), [(10, 2), (10, 3), (10, 4), (7, 3), (20, 6), (5, 5)])
def test_fewer_permutations_are_evenly_spaced_rotations(n: int, p: int) -> None:
    orders = permutations(ids_of(n), p, seed_key="imp-1")
    assert len(orders) == p and all(sorted(o) == list(range(n)) for o in orders)
    offsets = [k * n // p for k in range(p)]
    for cand in range(n):
        first = orders[0].index(cand)
        assert [o.index(cand) for o in orders] == [(first - s) % n for s in offsets]  # shown n/P positions apart


def test_shown_orders_do_not_depend_on_the_callers_order() -> None:
    ids = ids_of(9)
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    for p in (1, 2, 4, ALL):
        def shown(xs: list[str]) -> list[list[str]]:
            return [[xs[i] for i in o] for o in permutations(xs, p, seed_key="imp-1")]
        assert shown(ids) == shown(ids[::-1]) == shown(shuffled)
    # ... but they do depend on the request (no ad is shown first in every request), reproducibly
    assert [ids[i] for i in canonical_order(ids, seed_key="imp-1")] != [ids[i] for i in canonical_order(ids, seed_key="imp-2")]
    # without the canonical step the rotations start from the caller's order (the bench's measurement)
    assert permutations(ids, 2, seed_key="imp-1", canonical=False) == [list(range(9)), [(j + 4) % 9 for j in range(9)]]


def test_bad_permutation_counts_are_refused() -> None:
    for bad in (0, -1, "some"):
        with pytest.raises(ValueError):
            permutations(ids_of(3), bad, seed_key="x")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            scorer(FakeTopLLM({}), permutations=bad)
    with pytest.raises(ValueError):
        permutations(["a", "a"], 2, seed_key="x")


def test_prompt_layout_static_first_then_user_then_candidates() -> None:
    ads = list(demo_ads().values())
    calls = scorer(FakeTopLLM({"A": -0.1}), permutations=2).prepare(
        history_ads=ads[:2], events=[], candidates=as_candidates(ads[10:14]), seed_key="x"
    )
    a, b = calls
    assert a.messages[0] == b.messages[0]  # the system message is the same for every request
    user = a.messages[1]["content"]
    assert user.index(ads[0].title[:20]) < user.index(ads[10].title[:20])
    ids = [ad.ad_id for ad in ads[10:14]]
    assert a.order == [ids[i] for i in canonical_order(ids, seed_key="x")] and b.order == a.order[2:] + a.order[:2]
    title = {ad.ad_id: ad.title for ad in ads}
    assert f"A «{title[a.order[0]]}»" in user and f"A «{title[b.order[0]]}»" in b.messages[1]["content"]


def test_averaging_and_partial_failure() -> None:
    ads = list(demo_ads().values())[:3]
    top = {"A": math.log(0.7), "B": math.log(0.2), "C": math.log(0.1)}
    llm = FakeTopLLM(top, errors={2: LLMOutputInvalid(NO_LOGPROBS)})
    s = scorer(llm, permutations=3)
    calls = s.prepare(history_ads=[], events=[], candidates=as_candidates(ads), seed_key="")
    res = asyncio.run(s.ascore(history_ads=[], events=[], candidates=as_candidates(ads), timeout_s=5))
    assert res.candidate_ids == [ad.ad_id for ad in ads] and res.answered == 2 and res.failures == [NO_LOGPROBS]
    # the two answered orders (rotations 0 and 1 of the canonical order): each candidate's mean over them
    lp = label_logprobs(top, ["A", "B", "C"]).logprob
    first, second, third = calls[0].order  # shown A, B, C in the first order; C, A, B in the second
    assert calls[1].order == [second, third, first]
    assert res.logprob[first] == pytest.approx((lp["A"] + lp["C"]) / 2)
    assert res.logprob[second] == pytest.approx((lp["B"] + lp["A"]) / 2)
    assert res.position[first] == 1.0 and res.position[second] == 0.5
    assert sum(res.prob.values()) == pytest.approx(1.0)
    # each answered order's position and log-probability is kept (the fit's position control), the failed one's is not
    assert res.by_order == {first: [(0, lp["A"]), (2, lp["C"])], second: [(1, lp["B"]), (0, lp["A"])], third: [(2, lp["C"]), (1, lp["B"])]}
    assert res.ranking() == [second, first, third]


class FakeContentLLM:
    """Prefers the label shown for one title (+3 logits) over a first-label preference (+2): a model with a view."""

    model = "fake-content"

    def __init__(self, liked_title: str, *, like: float = 3.0):
        self.liked, self.like, self.messages = liked_title, like, []

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        self.messages.append(messages)
        rows = [line for line in messages[-1]["content"].splitlines() if line[:1] in LABELS and line[1:3] == " «"]
        logits = {row[0]: 2.0 * (i == 0) + self.like * (self.liked in row) for i, row in enumerate(rows)}
        norm = math.log(sum(math.exp(v) for v in logits.values()))
        top = {label: v - norm for label, v in logits.items()}
        return FirstToken(text="A", top=top, prompt_tokens=100, completion_tokens=1, latency_ms=1.0, model=self.model)


@pytest.mark.parametrize("p", [2, 3, ALL])
def test_any_input_order_gives_the_same_calls_terms_and_ranking(p) -> None:
    ads = list(demo_ads().values())[20:28]
    orders = [ads, ads[::-1], [ads[i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]]
    results, sent = [], []
    for order in orders:
        llm = FakeContentLLM(ads[5].title)
        results.append(asyncio.run(scorer(llm, permutations=p).ascore(
            history_ads=ads[:1], events=[], candidates=as_candidates(order), timeout_s=5, seed_key="imp-7")))
        sent.append(llm.messages)
    assert sent[0] == sent[1] == sent[2]  # the same requests
    assert results[0].logprob == results[1].logprob == results[2].logprob  # bit for bit
    assert results[0].ranking() == results[1].ranking() == results[2].ranking()
    assert results[0].ranking()[0] == ads[5].ad_id  # the content preference wins over the first-label one


def test_a_purely_positional_model_ties_every_candidate_and_the_tie_break_is_the_canonical_order() -> None:
    ads = list(demo_ads().values())[20:27]
    shuffled = ads[:]
    random.Random(5).shuffle(shuffled)
    rankings = []
    for order in (ads, ads[::-1], shuffled):
        top = {label: math.log(0.5 ** (i + 1)) for i, label in enumerate(LABELS[:7])}  # the first label most likely
        res = asyncio.run(scorer(FakeTopLLM(top), permutations=ALL).ascore(
            history_ads=[], events=[], candidates=as_candidates(order), timeout_s=5, seed_key="imp-9"))  # fmt: skip
        assert res.permutations == 7 and len(set(res.logprob.values())) == 1  # the Latin square: exactly one value
        rankings.append(res.ranking())
    ids = [ad.ad_id for ad in ads]
    assert rankings[0] == rankings[1] == rankings[2] == [ids[i] for i in canonical_order(ids, seed_key="imp-9")]


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
    # two rotations n/2 apart: every candidate shown at two positions n/2 apart
    assert all((shown[1][0] - shown[0][0]) % n == (-(n // 2)) % n for shown in res.by_order.values())


class RecordingLogprobLLM:
    """Delegates to the real scoring client and keeps every answer (to check the scorer's label accounting)."""

    def __init__(self, llm: LogprobLLMLike):
        self.llm, self.answers = llm, []

    @property
    def model(self) -> str:
        return self.llm.model

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        answer = await self.llm.afirst_token(messages, top_logprobs=top_logprobs, timeout_s=timeout_s)
        self.answers.append(answer)
        return answer


def test_real_server_balanced_design_n_calls_one_token_each_every_label_answered_or_counted(local_llm_url: str) -> None:
    ads = demo_ads()
    imp = demo_impressions(1)[0]
    n = 6
    llm = RecordingLogprobLLM(LogprobChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, timeout_s=600))
    res = asyncio.run(
        scorer(llm, permutations=ALL, max_candidates=n).ascore(
            history_ads=[ads[h] for h in imp["history"]], events=[], candidates=as_candidates([ads[c] for c in imp["candidates"]]),
            timeout_s=600, seed_key=imp["impression_id"],
        )
    )  # fmt: skip
    assert res.permutations == n and len(llm.answers) == n  # P = n: n calls
    assert res.completion_tokens == [1] * n  # exactly one completion token per call
    assert res.answered + len(res.failures) == n
    assert all(sorted(p for p, _ in shown) == list(range(n)) for shown in res.by_order.values())  # every position once
    labels = set(LABELS[:n])
    found = [len(labels & {t.strip() for t in a.top}) for a in llm.answers]
    assert res.missing_labels == sum(n - f for f in found if f)  # a label not returned is floored and counted, never dropped
    assert all(math.isfinite(v) for v in res.logprob.values()) and set(res.logprob) == set(imp["candidates"][:n])


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
