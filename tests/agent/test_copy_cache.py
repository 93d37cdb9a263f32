"""Copy off the hot path: cache keys, the bounded background queue and its drop policy, validation before caching."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agent.copy_cache import BackgroundCopier, CopyRewriter, Rejected, interest_key
from agent.copy_validator import validate_copy
from agent.llm import ChatLLM, Completion, Message
from agent.prompts import PromptRegistry
from kernel.settings import Settings
from kernel.types import Ad, Copy
from tests.utils.fakes import FakeQueueLLM
from tests.utils.counting import CountingLLM

SETTINGS = Settings(_env_file=None)
PROMPT = PromptRegistry(SETTINGS.prompts_dir).get("copy")
# Real-server tests use a 600 s deadline: the CPU is shared and the deadline is not what they test
# (llama.cpp serves one request at a time, so P concurrent calls wait for each other).
AD = Ad(
    ad_id="run-002", title="Tempo Glide daily trainer | Stridewell", category="running shoes",
    text="The Tempo Glide daily trainer gives you a soft landing and a fast toe-off. Now $119 with free returns.",
)  # fmt: skip


def lengths_only(copy: Copy, ad: Ad) -> list[str]:
    """A minimal injected validator: non-empty, within the display limits."""
    return [] if copy.headline and copy.description and len(copy.headline) <= 30 and len(copy.description) <= 90 else ["bad"]


def real_validator(copy: Copy, ad: Ad) -> list[str]:
    return validate_copy(copy, ad).reasons


class FakeHungLLM:
    """Never answers (until cancelled)."""

    model = "fake-hung"

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        raise AssertionError("sync path not used")

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_interest_key_is_the_most_frequent_recent_category() -> None:
    ads = [replace(AD, ad_id=str(i), category=c) for i, c in enumerate(["Pets", "running shoes", "pets", "books"])]
    assert interest_key(ads) == "pets"
    assert interest_key(ads[-2:]) == "books"  # a tie: the most recent wins
    assert interest_key([replace(AD, category="")]) == ""


def test_key_changes_with_ad_content_prompt_and_model() -> None:
    rewriter = CopyRewriter(FakeQueueLLM(model="m1"), PROMPT)
    key = rewriter.key(AD, "pets")
    assert key == rewriter.key(replace(AD, bid=9.0), "pets")  # the bid is not content
    assert key != rewriter.key(replace(AD, text=AD.text + " Now in blue."), "pets")
    assert key != rewriter.key(AD, "books")
    assert key != CopyRewriter(FakeQueueLLM(model="m2"), PROMPT).key(AD, "pets")
    other = PromptRegistry(SETTINGS.prompts_dir).get("copy")
    assert key.prompt_sha256 == other.sha256


def test_rejected_rewrite_is_cached_as_a_rejection_and_never_served() -> None:
    llm = FakeQueueLLM().enqueue(json.dumps({"headline": "The best trainer ever", "description": "Only $49 today!"}))

    async def run() -> tuple[Copy | None, Copy | None, BackgroundCopier]:
        async with BackgroundCopier(rewriter=CopyRewriter(llm, PROMPT), validate=real_validator) as copier:
            first = copier.lookup(AD, "running shoes")
            await copier.drain()
            return first, copier.lookup(AD, "running shoes"), copier

    first, second, copier = asyncio.run(run())
    assert first is None and second is None
    assert len(llm.calls) == 1 and copier.stats.rejected == 1 and copier.stats.rejected_hits == 1
    assert isinstance(copier.cache.get(CopyRewriter(llm, PROMPT).key(AD, "running shoes")), Rejected)


def test_hung_llm_full_queue_drops_are_counted_and_nothing_blocks() -> None:
    hung = FakeHungLLM()
    ads = [replace(AD, ad_id=f"a{i}", title=f"{AD.title} {i}") for i in range(6)]

    async def run() -> BackgroundCopier:
        copier = BackgroundCopier(rewriter=CopyRewriter(hung, PROMPT, timeout_s=0.3), validate=lengths_only, queue_size=2)
        async with copier:
            # lookup is a plain function: it cannot wait for the LLM; all six return before any worker runs
            assert [copier.lookup(ad, "x") for ad in ads] == [None] * 6
            assert copier.lookup(ads[0], "x") is None  # already queued: not queued twice
            await copier.drain()  # each hung call ends at the rewrite deadline
        return copier

    copier = asyncio.run(run())
    s = copier.stats
    assert (s.enqueued, s.dropped_full, s.deduped) == (2, 4, 1)
    assert s.failed == {"timeout": 2} and hung.calls == 2 and len(copier.cache) == 0


def test_miss_before_start_is_counted_not_queued() -> None:
    copier = BackgroundCopier(rewriter=CopyRewriter(FakeQueueLLM(), PROMPT), validate=lengths_only)
    assert copier.lookup(AD, "x") is None and copier.stats.dropped_stopped == 1


def test_real_server_rewrite_in_background_then_served_from_cache_without_a_call(local_llm_url: str) -> None:
    counting = CountingLLM(ChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, max_tokens=SETTINGS.copy_max_tokens, timeout_s=600))

    async def run() -> tuple[Copy | None, Copy | None, int, BackgroundCopier]:
        rewriter = CopyRewriter(counting, PROMPT, timeout_s=600)
        async with BackgroundCopier(rewriter=rewriter, validate=lengths_only, queue_size=4) as copier:
            miss = copier.lookup(AD, "running shoes")
            await copier.drain()
            calls_after_rewrite = counting.calls
            hit = copier.lookup(AD, "running shoes")
            return miss, hit, calls_after_rewrite, copier

    miss, hit, calls_after_rewrite, copier = asyncio.run(run())
    assert miss is None and calls_after_rewrite == 1
    assert copier.stats.generated == 1, copier.stats.as_dict()
    assert isinstance(hit, Copy) and hit.headline and len(hit.headline) <= 30
    assert counting.calls == 1  # the hit made no LLM call
    assert copier.stats.as_dict()["hit_rate"] == 0.5


def test_lookup_from_a_serving_thread_hands_the_miss_to_the_loop_and_the_next_lookup_hits() -> None:
    """The pipeline serves on a worker thread: a miss there is queued on the copier's loop, not lost."""
    llm = FakeQueueLLM().enqueue(json.dumps({"headline": "Tempo Glide daily trainer", "description": "A soft landing and a fast toe-off."}))

    async def run() -> tuple[Copy | None, Copy | None, BackgroundCopier]:
        async with BackgroundCopier(rewriter=CopyRewriter(llm, PROMPT), validate=real_validator, queue_size=1) as copier:
            first = await asyncio.to_thread(copier.lookup, AD, "running shoes")
            await copier.drain()
            second = await asyncio.to_thread(copier.cached_copy, AD, history_ads=[AD])
            return first, second, copier

    first, second, copier = asyncio.run(run())
    assert first is None and second is not None and second.headline == "Tempo Glide daily trainer"
    assert len(llm.calls) == 1 and copier.snapshot()["generated"] == 1 and copier.snapshot()["hits"] == 1
