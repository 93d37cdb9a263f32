"""Vectorised behaviour learning against the oracle (the pre-vectorised loop, tests/retrieval/reference_behaviour.py),
its memory bound, and crash-safe persistence of the tables."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from kernel.settings import REPO_ROOT, Settings
from retrieval.behaviour import BehaviourStats, count_behaviour
from retrieval.records import read_ads, read_histories
from tests.retrieval.reference_behaviour import reference_learn

DEMO = REPO_ROOT / "data" / "demo"
GAMES = REPO_ROOT.parent / "shared" / "data" / "amazon_games_6k"
GAMES_HISTORIES = 2000  # the first N full-catalog dev impressions: the old loop stays fast on them


def random_histories(seed: int, *, n_ids: int = 60, n: int = 400) -> tuple[list[str], list[list[str]]]:
    """Histories with what the loop had to handle: unknown ids, repeats (adjacent or not), duplicate and
    empty histories, histories that differ only in an unknown id, lengths 0 to beyond the window."""
    rng = random.Random(seed)
    ids = [f"ad{i}" for i in range(n_ids)]
    pool = ids + ["zz-unknown-1", "zz-unknown-2"]
    out: list[list[str]] = []
    for _ in range(n):
        roll = rng.random()
        if out and roll < 0.1:
            out.append(list(rng.choice(out)))  # the same user again
        elif out and roll < 0.15:
            out.append(rng.choice(out) + ["zz-unknown-1"])  # the same once unknown ids are dropped
        elif roll < 0.2:
            out.append([])
        else:
            h = [rng.choice(pool[: rng.randint(3, len(pool))]) for _ in range(rng.randint(1, 30))]
            if len(h) > 3 and rng.random() < 0.3:
                h[2] = h[1]  # adjacent repeat
            out.append(h)
    return ids, out


def demo_data() -> tuple[list[str], list[list[str]]]:
    return [a.ad_id for a in read_ads(DEMO / "ads.jsonl")], read_histories(DEMO / "impressions.jsonl")


def games_data() -> tuple[list[str], list[list[str]]]:
    with (GAMES / "impressions_full_dev.jsonl").open() as fh:
        hists = [json.loads(line)["history"] for _, line in zip(range(GAMES_HISTORIES), fh)]
    return [a.ad_id for a in read_ads(GAMES / "ads.jsonl")], hists


S = Settings(_env_file=None)
CASES = {
    "demo-defaults": (demo_data, S.covisit_window, S.recency_decay, S.cf_dims),
    "games": (games_data, S.covisit_window, S.recency_decay, 16),  # bench_behaviour: all of them, at 64 dims
    "random-w3": (lambda: random_histories(1), 3, 0.5, 8),
    "random-w10": (lambda: random_histories(2, n_ids=200, n=800), 10, 0.8, 16),
    "random-tiny": (lambda: random_histories(3, n_ids=4, n=30), 2, 0.9, 8),
    "no-history": (lambda: (["a", "b", "c", "d"], [[], ["zz"], []]), 5, 0.8, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_learned_tables_equal_the_pre_vectorised_oracle(case: str):
    load, window, decay, dims = CASES[case]
    ids, hists = load()
    new = BehaviourStats.learn(hists, ids, window=window, decay=decay, cf_dims=dims)
    old = reference_learn(hists, ids, window=window, decay=decay, cf_dims=dims)
    exact = reference_learn(hists, ids, window=window, decay=decay, cf_dims=None, dtype=np.float64)

    assert new.n_histories == old["n_histories"]
    np.testing.assert_array_equal(new.popularity, old["popularity"])
    for name in ("forward", "symmetric"):
        got, want = getattr(new, name), old[name]
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got.indptr, want.indptr)  # the same pairs, stored in the same order
        np.testing.assert_array_equal(got.indices, want.indices)
        # The old loop summed float32 weights in an order std::sort leaves unspecified (1 ulp off on a few
        # % of pairs); today's sums are float64, rounded once: within float32 rounding of the old table,
        np.testing.assert_allclose(got.data, want.data, rtol=1e-6, atol=0)
    # ... bit-identical to the exact sums rounded to float32, and equal to them to 1e-9 before rounding.
    np.testing.assert_array_equal(new.forward.data, exact["forward"].data.astype(np.float32))
    counts = count_behaviour(hists, ids, window=window, decay=decay)
    np.testing.assert_array_equal(counts.forward.indices, exact["forward"].indices)
    np.testing.assert_allclose(counts.forward.data, exact["forward"].data, rtol=0, atol=1e-9)
    if old["cf"] is None:
        assert new.cf is None
    else:
        assert new.cf is not None and new.cf.shape == old["cf"].shape
        np.testing.assert_allclose(new.cf, old["cf"], rtol=0, atol=1e-9)


def test_chunking_changes_nothing():
    """Histories cut into many small chunks (each merged into the running sums) give the same tables."""
    ids, hists = random_histories(4, n_ids=80, n=600)
    one = count_behaviour(hists, ids, window=6, decay=0.7, chunk_events=10**9)
    many = count_behaviour(iter(hists), ids, window=6, decay=0.7, chunk_events=7)
    assert many.n_histories == one.n_histories
    np.testing.assert_array_equal(many.popularity, one.popularity)
    for name in ("forward", "co"):
        a, b = getattr(many, name), getattr(one, name)
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.data, b.data, rtol=0, atol=1e-9)


def test_memory_does_not_grow_with_the_pair_occurrences_only_with_the_distinct_pairs():
    """Histories of 20 events over 30 ads: at most 870 distinct pairs however many histories. The old loop
    kept every pair occurrence in Python lists (~2 million at 10,000 histories, 4 times that at 40,000);
    streaming keeps the distinct pairs, one chunk of events and one key per distinct history."""
    ids = [f"ad{i}" for i in range(30)]

    def peak_bytes(n_hist: int) -> int:
        rng = np.random.default_rng(0)
        histories = ([ids[i] for i in rng.integers(0, len(ids), size=20)] for _ in range(n_hist))
        tracemalloc.start()
        try:
            stats = BehaviourStats.learn(histories, ids, window=10, decay=0.8, cf_dims=4)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert stats.n_histories == n_hist and stats.forward.nnz <= 30 * 29
        return peak

    small, large = peak_bytes(10_000), peak_bytes(40_000)
    # 30,000 more distinct histories may cost their keys (< 200 bytes each), nothing per pair occurrence.
    assert large < small + 30_000 * 200, f"{small / 2**20:.1f} MB -> {large / 2**20:.1f} MB"


# ---- crash-safe persistence ------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {root!r})
    from tests.retrieval.test_behaviour_scaling import big_stats
    stats = big_stats()
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # a write past this size fails
    stats.save(__import__("pathlib").Path({directory!r}))
    """
)


def small_stats() -> BehaviourStats:
    ids, hists = random_histories(5, n_ids=400, n=50)
    return BehaviourStats.learn(hists, ids, window=3, decay=0.8, cf_dims=8)


def big_stats() -> BehaviourStats:
    ids, hists = random_histories(6, n_ids=400, n=3000)
    return BehaviourStats.learn(hists, ids, window=10, decay=0.8, cf_dims=16)


def assert_same_tables(a: BehaviourStats, b: BehaviourStats) -> None:
    assert (a.ids, a.n_histories, a.window, a.decay) == (b.ids, b.n_histories, b.window, b.decay)
    np.testing.assert_array_equal(a.popularity, b.popularity)
    np.testing.assert_array_equal(a.forward.toarray(), b.forward.toarray())
    np.testing.assert_array_equal(a.cf, b.cf)


def _file_sizes(stats: BehaviourStats, directory: Path) -> list[int]:
    stats.save(directory)
    return sorted({p.stat().st_size for p in directory.iterdir()})


def test_a_save_that_dies_part_way_leaves_the_previous_tables_loadable(tmp_path: Path):
    """A real process saves new tables and fails part-way (RLIMIT_FSIZE: any write past a size fails) at
    every file boundary in turn; whatever it managed to write, the directory loads the previous tables
    exactly, and the next complete save replaces them and leaves no partial files behind."""
    old, new = small_stats(), big_stats()
    directory = tmp_path / "behaviour"
    old.save(directory)
    sizes = _file_sizes(new, tmp_path / "scratch")  # every file a save of `new` writes, by size
    assert len(sizes) >= 3
    for size in sizes:
        limit = size - 1  # this file and every larger one cannot be written completely
        res = subprocess.run(
            [sys.executable, "-c", CHILD.format(root=str(REPO_ROOT), limit=limit, directory=str(directory))],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
        )  # fmt: skip
        assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
        assert_same_tables(BehaviourStats.load(directory, old.ids), old)

    new.save(directory)
    assert_same_tables(BehaviourStats.load(directory, new.ids), new)
    before = set(json.loads((directory / "behaviour.json").read_text())["files"].values())
    new.save(directory)  # the previous generation stays (for a reader that just read its manifest), no other
    now = set(json.loads((directory / "behaviour.json").read_text())["files"].values())
    assert {p.name for p in directory.iterdir()} == before | now | {"behaviour.json"}
    assert_same_tables(BehaviourStats.load(directory, new.ids), new)


def test_tables_saved_before_generations_still_load(tmp_path: Path):
    """A data dir written by the previous layout (fixed file names, no file list in behaviour.json)."""
    import scipy.sparse as sp

    stats = small_stats()
    sp.save_npz(tmp_path / "covisit_forward.npz", stats.forward)
    np.save(tmp_path / "popularity.npy", stats.popularity)
    np.save(tmp_path / "cf.npy", stats.cf)
    meta = {"ids": stats.ids, "n_histories": stats.n_histories, "window": stats.window, "decay": stats.decay}
    (tmp_path / "behaviour.json").write_text(json.dumps(meta))
    assert_same_tables(BehaviourStats.load(tmp_path, stats.ids), stats)

    big = big_stats()
    big.save(tmp_path)
    big.save(tmp_path)  # two generations later the legacy files are gone
    assert not (tmp_path / "covisit_forward.npz").exists() and not (tmp_path / "cf.npy").exists()
    assert_same_tables(BehaviourStats.load(tmp_path, big.ids), big)


def test_a_table_the_manifest_names_but_cannot_read_is_a_catalog_error(tmp_path: Path):
    from kernel.errors import CatalogError

    stats = small_stats()
    stats.save(tmp_path)
    meta = json.loads((tmp_path / "behaviour.json").read_text())
    (tmp_path / meta["files"]["forward"]).write_bytes(b"not a table")
    with pytest.raises(CatalogError):
        BehaviourStats.load(tmp_path, stats.ids)
