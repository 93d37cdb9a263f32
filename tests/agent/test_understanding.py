"""Ad understanding at ingest: validated records, counted failures, an append-only cache a re-run is served from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.llm import ChatLLM
from agent.prompts import PromptRegistry
from agent.understanding import (
    STORE_FILE,
    AdUnderstander,
    AdUnderstanding,
    UnderstandingStore,
    grounded_claims,
    output_schema,
    parse_understanding,
)
from kernel.errors import LLMOutputInvalid, LLMUnavailable
from kernel.settings import Settings
from kernel.types import Ad
from tests.utils.fakes import FakeQueueLLM
from tests.utils.counting import CountingLLM

SETTINGS = Settings(_env_file=None)
PROMPT = PromptRegistry(SETTINGS.prompts_dir).get("understand")
# Real-server tests use a 600 s deadline: the CPU is shared and the deadline is not what they test
# (llama.cpp serves one request at a time, so P concurrent calls wait for each other).
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def demo_ads(n: int) -> list[Ad]:
    rows = [json.loads(line) for line in (DEMO / "ads.jsonl").open(encoding="utf-8")][:n]
    return [Ad(ad_id=r["ad_id"], title=r["title"], text=r.get("text", ""), category=r["category"]) for r in rows]


def answer(category: str = "running shoes", claims: list[dict[str, str]] | None = None, **extra: Any) -> str:
    return json.dumps({"category": category, "tags": ["Road", "shoe"], "claims": claims or [], "summary": "A road shoe.\n", **extra})


def test_parse_validates_and_normalises() -> None:
    rec = parse_understanding(answer(claims=[{"kind": "price", "text": "$119"}]))
    assert rec.category == "running shoes" and rec.tags == ["road", "shoe"] and rec.summary == "A road shoe."
    for raw, reason in [
        ("not json", "malformed_json"),
        (answer(mood="happy"), "schema_mismatch"),  # extra="forbid"
        (answer(claims=[{"kind": "rumour", "text": "x"}]), "schema_mismatch"),
        (answer(category=""), "schema_mismatch"),
    ]:
        with pytest.raises(LLMOutputInvalid) as exc:
            parse_understanding(raw)
        assert exc.value.reason == reason
    with pytest.raises(LLMOutputInvalid):
        parse_understanding(answer(category="pets"), taxonomy=["sports", "news"])
    assert output_schema(["Sports", "news"])["properties"]["category"]["enum"] == ["Sports", "news"]


def test_claims_not_in_the_ad_are_dropped() -> None:
    ad = demo_ads(2)[1]  # "... Now $119 with free returns."
    rec = AdUnderstanding.model_validate(json.loads(answer(claims=[
        {"kind": "price", "text": "$119"}, {"kind": "offer", "text": "Free  Returns"}, {"kind": "offer", "text": "50% off"}])))  # fmt: skip
    kept, dropped = grounded_claims(rec, ad)
    assert [c.text for c in kept.claims] == ["$119", "Free  Returns"] and dropped == 1


def test_failures_are_counted_stored_and_a_rerun_is_all_cache_hits(tmp_path: Path) -> None:
    ads = demo_ads(4)
    llm = FakeQueueLLM().enqueue(answer(), "garbage", LLMUnavailable("connection"), answer())
    understander = AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path), concurrency=1, batch_size=2)
    first = understander.run(ads, progress=False)
    assert (first.generated, dict(first.invalid), dict(first.unavailable)) == (2, {"malformed_json": 1}, {"connection": 1})
    assert first.generated + sum(first.invalid.values()) + sum(first.unavailable.values()) == len(ads)

    # A new process: the store is read back from disk; only the unavailable ad is asked again.
    llm.enqueue(answer())
    again = AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path), concurrency=2)
    second = again.run(ads, progress=False)
    assert (second.cached, second.generated, len(llm.calls)) == (3, 1, 5)
    third = AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path)).run(ads, progress=False)
    assert third.cached == len(ads) and third.as_dict()["hit_rate"] == 1.0 and len(llm.calls) == 5
    assert again.get(ads[0]) is not None and again.get(ads[1]) is None  # ads[1] is a stored failure


def test_key_depends_on_content_prompt_model_and_taxonomy(tmp_path: Path) -> None:
    store = UnderstandingStore(tmp_path)
    ad = demo_ads(1)[0]
    base = AdUnderstander(FakeQueueLLM(model="m"), PROMPT, store=store)
    assert base.key(ad) == AdUnderstander(FakeQueueLLM(model="m"), PROMPT, store=store).key(ad)
    assert base.key(ad) != AdUnderstander(FakeQueueLLM(model="m2"), PROMPT, store=store).key(ad)
    assert base.key(ad) != AdUnderstander(FakeQueueLLM(model="m"), PROMPT, store=store, taxonomy=["a"]).key(ad)
    assert base.key(ad) != base.key(Ad(ad_id=ad.ad_id, title=ad.title + "!", text=ad.text))


def test_a_torn_last_line_is_skipped_and_redone(tmp_path: Path) -> None:
    ads = demo_ads(2)
    llm = FakeQueueLLM().enqueue(answer(), answer())
    AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path)).run(ads, progress=False)
    path = tmp_path / STORE_FILE
    path.write_text(path.read_text()[:-40])  # a crash mid-write
    store = UnderstandingStore(tmp_path)
    assert store.corrupt_lines == 1
    llm.enqueue(answer())
    report = AdUnderstander(llm, PROMPT, store=store).run(ads, progress=False)
    assert (report.cached, report.generated) == (1, 1)


def test_real_server_small_slice_then_rerun_from_cache(local_llm_url: str, tmp_path: Path) -> None:
    ads = demo_ads(2)
    counting = CountingLLM(ChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, max_tokens=SETTINGS.understand_max_tokens, timeout_s=600))
    first = AdUnderstander(counting, PROMPT, store=UnderstandingStore(tmp_path), timeout_s=600).run(ads, progress=False)
    assert first.unavailable == {}
    assert first.generated + sum(first.invalid.values()) == len(ads)  # a validated record or a counted failure each
    assert counting.calls == len(ads)
    rerun = AdUnderstander(counting, PROMPT, store=UnderstandingStore(tmp_path), timeout_s=600).run(ads, progress=False)
    assert rerun.cached == len(ads) and counting.calls == len(ads)


def test_a_run_that_dies_mid_batch_keeps_every_ad_it_finished(tmp_path: Path) -> None:
    ads = demo_ads(4)
    llm = FakeQueueLLM().enqueue(answer(), answer(), RuntimeError("the process dies here"))
    with pytest.raises(RuntimeError):
        AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path), concurrency=1, batch_size=8).run(ads, progress=False)
    assert len(UnderstandingStore(tmp_path)) == 2  # one batch of 8, but the two finished ads were written
    llm.enqueue(answer(), answer())
    resumed = AdUnderstander(llm, PROMPT, store=UnderstandingStore(tmp_path)).run(ads, progress=False)
    assert (resumed.cached, resumed.generated) == (2, 2)


def test_an_all_cached_ingest_rerun_starts_no_bundled_server(local_llm_url: str, tmp_path: Path) -> None:
    """The ingest hook without ADSELECT_LLM_URL starts the bundled server on the first cache miss only: the
    second run points the bundled server at a GGUF that does not exist, so starting it would fail."""
    import contextlib

    from kernel.errors import LocalLLMStartError
    from agent.understanding import understanding_at_ingest

    ads = demo_ads(2)
    live = SETTINGS.model_copy(update={"data_dir": tmp_path, "llm_url": local_llm_url, "understand_timeout_s": 600.0})
    reports: list = []
    with contextlib.ExitStack() as stack:
        understanding_at_ingest(live, stack, reports=reports)(ads)
    assert reports[0].generated + sum(reports[0].invalid.values()) == len(ads)
    broken = SETTINGS.model_copy(update={"data_dir": tmp_path, "llm_url": None, "local_llm_gguf": tmp_path / "missing.gguf"})
    with contextlib.ExitStack() as stack:
        out = understanding_at_ingest(broken, stack, reports=reports)(ads)
    assert reports[1].cached == len(ads) and reports[1].generated == 0 and len(out) == len(ads)
    with contextlib.ExitStack() as stack, pytest.raises(LocalLLMStartError):  # a miss does start it (and fails on the missing file)
        understanding_at_ingest(broken, stack, reports=reports)(demo_ads(3))
