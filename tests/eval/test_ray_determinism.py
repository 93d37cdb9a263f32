"""The same impression gets the same candidates, features and rankings in every process: at the BLAS thread
count every process pins (settings.blas_threads, applied by build_services), and without asking Chroma's
HNSW, whose graph differs between processes, when the catalog is searched exactly (the full-catalog Games gap)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from eval.baselines import FullView, dense_full, order_by
from eval.rankers import FastRankers
from kernel.errors import CatalogError
from kernel.settings import Settings
from retrieval.features import build_profile
from selection.services import make_store


def test_every_process_that_scores_pins_the_blas_threads(tmp_path: Path) -> None:
    """build_services (the endpoint's workers, eval, tune and every Ray actor build through it) pins BLAS to
    settings.blas_threads: a gemv's last bits depend on its thread count (rows split between threads go
    through other kernels), so an unpinned process could rank near ties differently from the others."""
    from threadpoolctl import threadpool_info

    from selection.services import build_services

    settings = Settings(_env_file=None, data_dir=tmp_path, blas_threads=1)
    with threadpool_limits(limits=2, user_api="blas"):
        with pytest.raises(CatalogError):  # an empty data dir has no catalog: the pinning comes first
            build_services(settings)
        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)


def test_the_dense_baseline_searches_exactly_when_the_pipeline_does(demo_services, tmp_path: Path) -> None:
    """Full catalog with use_chroma: within exact_search_max_ads the dense source searches in memory, and
    so does the dense baseline (exact top-n by score, ties by tie key), never Chroma's per-process HNSW:
    given a real but empty collection, it still ranks the whole catalog."""
    empty = make_store(Settings(_env_file=None, data_dir=tmp_path, collection="ads_empty"))
    selector = dataclasses.replace(demo_services.selector, generator=dataclasses.replace(demo_services.selector.generator, store=empty))
    assert selector.generator.use_chroma and selector.generator.searches_exactly()
    rankers = FastRankers(selector=selector, bm25=None, systems=["dense"], n_retrieve=10, use_chroma=True, seed=0)
    index = demo_services.index
    hist = [0, 3]
    got = dense_full(rankers.res, FullView(imp=None, stage=None, hist_rows=hist, exclude=set(hist)))
    scores = (index.vectors @ build_profile(index, hist, decay=selector.recency_decay).vector).astype(np.float64)
    want = [index.ids[i] for i in order_by(scores, rankers.res.tiebreak) if i not in hist][:10]
    assert got == want
