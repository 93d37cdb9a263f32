"""Ad understanding at ingest, against the real bundled llama.cpp server, real Chroma and the real embedder:
every ad of a demo slice gets a validated record or a counted failure, stored in its Chroma metadata; a
re-run is served wholly from the understanding cache and leaves the collection as it was."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.llm import ChatLLM
from agent.prompts import PromptRegistry
from agent.understanding import METADATA_KEY, AdUnderstander, UnderstandingStore, ingest_hook, understanding_of
from kernel.settings import Settings
from kernel.types import DOCUMENT_EXTRA_KEY
from retrieval.ingest import ingest_catalog
from selection.services import make_store

SETTINGS = Settings(_env_file=None)
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "ads.jsonl"
SLICE = 4  # the bundled model on a shared CPU: a few ads, every kind of outcome still counted


@pytest.mark.llm_server
def test_ingest_understand_real_server_then_rerun_from_cache(local_llm_url: str, tmp_path: Path, embedder) -> None:
    rows = [json.loads(line) for line in DEMO.open(encoding="utf-8")][:SLICE]
    rows[0] = {**rows[0], "category": "", "subcategory": ""}  # an ad without a category of its own
    ads_path = tmp_path / "ads.jsonl"
    ads_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = make_store(Settings(_env_file=None, data_dir=tmp_path / "var"))
    llm = ChatLLM(base_url=local_llm_url, model=SETTINGS.llm_model, max_tokens=SETTINGS.understand_max_tokens, timeout_s=600)
    prompt = PromptRegistry(SETTINGS.prompts_dir).get(SETTINGS.understand_prompt_name)

    def hook(reports: list):
        understander = AdUnderstander(llm, prompt, store=UnderstandingStore(tmp_path / "understanding"), timeout_s=600)
        return ingest_hook(understander, summary_in_document=True, progress=False, reports=reports)

    first: list = []
    rep = ingest_catalog(ads_path=ads_path, store=store, embedder=embedder, enrich=hook(first))
    (report,) = first
    assert report.unavailable == {}
    assert report.generated + sum(report.invalid.values()) == SLICE  # a validated record or a counted failure each
    stored = {a.ad_id: a for a in store.load_index().ads}
    understood = [a for a in stored.values() if understanding_of(a) is not None]
    assert len(understood) == report.generated
    for ad in understood:  # the record went through Chroma's metadata and back
        assert ad.metadata[METADATA_KEY]["category_source"] == "extracted"
        assert ad.metadata[DOCUMENT_EXTRA_KEY] == understanding_of(ad).summary
        assert understanding_of(ad).summary in ad.document()
        source = f"{ad.title} {ad.text}".casefold()
        assert all(" ".join(c.text.casefold().split()) in " ".join(source.split()) for c in understanding_of(ad).claims)

    again: list = []
    rerun = ingest_catalog(ads_path=ads_path, store=store, embedder=embedder, enrich=hook(again))
    assert again[0].cached == SLICE and again[0].as_dict()["hit_rate"] == 1.0 and again[0].generated == 0
    assert rerun.skipped_unchanged and rerun.content_hash == rep.content_hash
    llm.close()
