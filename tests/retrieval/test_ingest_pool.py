"""Ingest with the embedding in worker processes (retrieval.embed_pool): the same vectors in the same
order as one process, and a worker killed mid-ingest fails the ingest, keeps the written batches and a
re-run embeds only the rest."""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from kernel.settings import Settings
from retrieval.embedder import Embedder
from retrieval.ingest import IN_PROGRESS, ingest_catalog
from selection.services import make_store

DEMO_ADS = Path(__file__).resolve().parents[2] / "data" / "demo" / "ads.jsonl"


@pytest.fixture(scope="module")
def onnx_embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder(backend="onnx", onnx_dir=tmp_path_factory.mktemp("onnx_exports"), threads=1)


def store_for(tmp_path: Path, name: str):
    return make_store(Settings(_env_file=None, data_dir=tmp_path / name, llm_url=None))


def test_two_embedding_processes_give_one_processs_vectors_in_order(tmp_path: Path, onnx_embedder: Embedder):
    one = store_for(tmp_path, "one")
    two = store_for(tmp_path, "two")
    ingest_catalog(ads_path=DEMO_ADS, store=one, embedder=onnx_embedder, batch_size=64, embed_processes=1)
    rep = ingest_catalog(ads_path=DEMO_ADS, store=two, embedder=onnx_embedder, batch_size=64, embed_processes=2, pool_min_ads=1)
    assert "pool_start_s" in rep.timings_s and rep.embedded == 300
    a, b = one.load_index(), two.load_index()
    assert a.ids == b.ids
    np.testing.assert_allclose(b.vectors, a.vectors, atol=1e-6)
    assert not multiprocessing.active_children()  # the workers are gone


def test_a_killed_worker_fails_the_ingest_and_a_rerun_embeds_only_the_rest(tmp_path: Path, onnx_embedder: Embedder):
    store = store_for(tmp_path, "var")

    def kill_a_worker(written: int, total: int) -> None:
        if written == 30:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    with pytest.raises(BrokenProcessPool):
        ingest_catalog(ads_path=DEMO_ADS, store=store, embedder=onnx_embedder, batch_size=30, embed_processes=2,
                       pool_min_ads=1, on_batch=kill_a_worker, queue_depth=1)  # fmt: skip
    kept = store.count()
    assert 30 <= kept < 300 and store.stored_hash() == IN_PROGRESS  # whole batches only, the catalog not marked done
    assert not multiprocessing.active_children()
    again = ingest_catalog(ads_path=DEMO_ADS, store=store, embedder=onnx_embedder, batch_size=30, embed_processes=1)
    assert again.embedded == 300 - kept and again.unchanged == kept and store.count() == 300
