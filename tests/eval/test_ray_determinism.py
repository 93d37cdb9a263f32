"""The same impression gets the same candidates, features and rankings in every process: whatever the BLAS
thread count (a Ray actor and the driver may differ), and without asking Chroma's HNSW, whose graph
differs between processes, when the catalog is searched exactly (the full-catalog Games gap)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from eval.baselines import FullView, Resources, dense_full, order_by
from eval.rankers import FastRankers
from kernel.settings import Settings
from kernel.types import Ad
from retrieval.behaviour import BehaviourStats
from retrieval.candidates import CandidateGenerator
from retrieval.features import build_profile
from retrieval.store import CatalogIndex
from selection.services import make_store


def _near_tie_catalog(n: int = 6002, d: int = 384, ties: int = 8) -> CatalogIndex:
    """Row 0 points along (1, …, 1). The last `ties` rows hold the same values in other orders, so their
    cosines with row 0 are equal in exact arithmetic and differ only by rounding: they are the top of the
    dense ranking, in an order decided by the last bit of each sum. The other rows are random, far below.
    A BLAS gemv splits the rows between its threads and computes the rows left over at the end of each
    share (here the last rows, n not a multiple of 4) with another kernel, so their last bit moves."""
    rng = np.random.default_rng(7)
    base = rng.random(d).astype(np.float32) * np.float32(2.0) ** rng.integers(-6, 6, d).astype(np.float32)
    far = rng.standard_normal((n - 1 - ties, d)).astype(np.float32)
    near = np.vstack([rng.permutation(base) for _ in range(ties)])
    m = np.vstack([np.ones((1, d), dtype=np.float32), far, near]).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    ids = [f"ad{i}" for i in range(n)]
    return CatalogIndex(ids=ids, row={a: i for i, a in enumerate(ids)}, ads=[Ad(a, a) for a in ids], vectors=m, content_hash="near-ties")


def _rankings(index: CatalogIndex, blas_threads: int) -> tuple[list[int], bytes, list[str]]:
    behaviour = BehaviourStats.empty(index.ids)
    behaviour.cf = index.vectors[:, :64].copy()  # any vectors: the collaborative source is a full-catalog product too
    gen = CandidateGenerator(index=index, store=None, behaviour=behaviour, use_chroma=False, n_dense=100, n_covisit=0, n_popular=0, n_cf=100)
    profile = build_profile(index, [0], decay=0.8)
    res = Resources(
        index=index, behaviour=behaviour, store=None, bm25=None, seed=0, n_retrieve=100, use_chroma=False, recency_decay=0.8, exclude_history=True,
    )  # fmt: skip
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        cands = gen.generate(profile, exclude={0})
        baseline = dense_full(res, FullView(imp=None, stage=None, hist_rows=[0], exclude={0}))
    sources = cands.by_source["dense"].tolist() + [-1] + cands.by_source["cf"].tolist()
    return sources, cands.features.tobytes(), baseline


def test_candidates_features_and_the_dense_baseline_do_not_depend_on_the_blas_threads() -> None:
    index = _near_tie_catalog()
    one = _rankings(index, 1)
    assert len(set((index.vectors[-8:] @ index.vectors[0]).tolist())) > 1  # the near ties are real: rounding tells them apart
    for _ in range(3):
        two = _rankings(index, 2)
        assert two[0] == one[0]  # the dense and collaborative sources
        assert two[1] == one[1]  # every feature, bit for bit
        assert two[2] == one[2]  # the dense baseline's top 100


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
