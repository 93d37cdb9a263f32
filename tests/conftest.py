"""Shared fixtures, kept few. `local_llm_url`: one real llama.cpp server (bundled SmolLM2) per session."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from kernel.settings import Settings


@pytest.fixture(scope="session")
def local_llm_url() -> Iterator[str]:
    """Base URL (http://127.0.0.1:PORT/v1) of a real `llama_cpp.server` started once for the session.

    The model answers to `Settings().llm_model`; the server is stopped at the end of the session.
    """
    from agent.local_server import LocalLLMServer, free_port

    with LocalLLMServer.from_settings(Settings(_env_file=None), port=free_port()) as server:
        yield server.base_url


# ---- The demo catalog, ingested once per session (tests/retrieval, tests/adselect, tests/server) ----------

from pathlib import Path  # noqa: E402 - appended section

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="session")
def embedder():
    """The real MiniLM sentence-transformers embedder, loaded once for the session."""
    from selection.services import make_embedder

    return make_embedder(Settings(_env_file=None))


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory: pytest.TempPathFactory, embedder) -> Settings:
    """Settings over a fresh data dir holding data/demo/ads.jsonl in embedded Chroma and the behaviour
    tables learned from data/demo/impressions.jsonl (ingested once; tests never re-ingest into it)."""
    from selection.services import behaviour_dir, make_store
    from retrieval.ingest import ingest_catalog, learn_behaviour

    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("demo_var"), llm_url=None)
    store = make_store(settings)
    ingest_catalog(ads_path=DEMO_DIR / "ads.jsonl", store=store, embedder=embedder)
    learn_behaviour(
        history_paths=[DEMO_DIR / "impressions.jsonl"],
        catalog_ids=store.load_index().ids,
        out_dir=behaviour_dir(settings),
        window=settings.covisit_window,
        decay=settings.recency_decay,
        cf_dims=settings.cf_dims,
    )
    return settings


@pytest.fixture(scope="session")
def demo_services(demo_settings: Settings, embedder):
    """Services over the demo data dir with the LLM stage off; tests that need an LLM stage build a
    Selector from these with `dataclasses.replace(services.selector, reranker=...)`."""
    from selection.services import build_services

    return build_services(demo_settings, embedder=embedder)
