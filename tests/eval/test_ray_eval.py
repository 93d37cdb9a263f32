"""`adselect eval run --ray`: a local Ray (2 CPUs) gives the single-process run's numbers, from JSONL and
Parquet, and its LLM actors call real endpoints. One Ray per module; shut down (raylet included) after it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval.cli import RAY_LOCAL, ray_flag_default
from tests.eval.conftest import MIND, run_task

import ray  # noqa: E402 - a real dependency (the ray extra): missing, the tests fail, never skip

FAST = ["random", "popularity", "bm25", "dense", "covisit", "sequence", "default"]


@pytest.fixture(scope="module")
def local_ray():
    from eval.distributed import ray_session

    with ray_session() as info:  # ray.shutdown() on exit
        yield info
    assert not ray.is_initialized()


def _backend(**kw):
    from eval.distributed import RayBackend

    return RayBackend(workers=2, batch_size=8, **kw)


def _same_numbers(a: dict, b: dict) -> None:
    assert a["n"] == b["n"] and a["skipped"] == b["skipped"] and a["n_read"] == b["n_read"]
    assert a["data_warnings"] == b["data_warnings"]
    for system, metrics in a["metrics"].items():
        for name, value in metrics.items():
            other = b["metrics"][system][name]
            assert (value is None) == (other is None), (system, name)
            if value is not None:
                assert math.isclose(value, other, rel_tol=0, abs_tol=1e-9), (system, name, value, other)
    assert a["ci"] == b["ci"] and a["paired_vs_default"] == b["paired_vs_default"]
    assert a.get("calibration") == b.get("calibration")


def _fast_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if '"phase": "fast"' in line]


def test_ray_flag_without_an_address_means_a_local_ray() -> None:
    assert ray_flag_default(["run", "--ray"]) == ["run", "--ray", RAY_LOCAL]
    assert ray_flag_default(["run", "--ray", "--out", "x"]) == ["run", "--ray", RAY_LOCAL, "--out", "x"]
    assert ray_flag_default(["run", "--ray", "auto", "--out", "x"]) == ["run", "--ray", "auto", "--out", "x"]


def test_ray_run_gives_the_single_process_metrics(local_ray, eval_settings, tmp_path: Path) -> None:
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")}, "systems": FAST, "no_llm": True}
    single = run_task(doc, settings=eval_settings, out=tmp_path / "single")
    on_ray = run_task(doc, settings=eval_settings, out=tmp_path / "ray", backend=_backend())
    assert on_ray["speed"]["fast"]["backend"] == "ray" and on_ray["speed"]["fast"]["workers"] == 2
    assert single["n"]["default"] > 0
    _same_numbers(single, on_ray)
    # per impression, the same records, gathered back in input order
    assert _fast_records(tmp_path / "single") == _fast_records(tmp_path / "ray")


def test_ray_reads_parquet_parts_and_the_limit(local_ray, eval_settings, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (MIND / "impressions_dev.jsonl").read_text().splitlines() if line.strip()]
    parts = tmp_path / "parts"
    parts.mkdir()
    half = len(rows) // 2
    for name, chunk in (("part-000.parquet", rows[:half]), ("part-001.parquet", rows[half:])):
        pq.write_table(pa.Table.from_pylist(chunk), parts / name)
    limit = half + 5  # crosses the part boundary
    data = {"ads": str(MIND / "ads.jsonl"), "train": [str(MIND / "impressions_dev.jsonl")], "limit": limit}
    single = run_task(
        {"data": {**data, "impressions": str(MIND / "impressions_dev.jsonl")}, "systems": FAST, "no_llm": True},
        settings=eval_settings, out=tmp_path / "single",
    )  # fmt: skip
    on_ray = run_task(
        {"data": {**data, "impressions": str(parts)}, "systems": FAST, "no_llm": True},
        settings=eval_settings, out=tmp_path / "ray", backend=_backend(),
    )  # fmt: skip
    assert on_ray["n_read"] == limit
    _same_numbers(single, on_ray)


@pytest.mark.llm_server
def test_ray_llm_actors_call_the_endpoints_and_match_the_single_process_run(local_ray, local_llm_url: str, eval_settings, tmp_path: Path) -> None:
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "systems": ["random", "default", "llm", "default+llm"],
        "llm": {"url": local_llm_url, "sample": 3, "position_bias": False, "max_candidates": 6, "timeout_s": 120, "concurrency": 1},
    }
    cache = tmp_path / "llm_cache.sqlite"
    # two "endpoints" (the same server twice): one LLM actor each
    on_ray = run_task(doc, settings=eval_settings, out=tmp_path / "ray", llm_cache_path=cache, backend=_backend(llm_urls=(local_llm_url, local_llm_url)))
    assert on_ray["speed"]["llm"]["actors"] == 2 and on_ray["n"]["llm"] == 3
    assert on_ray["llm"]["cache"]["misses"] == 3  # the actors' calls, counted in the driver's report
    single = run_task(doc, settings=eval_settings, out=tmp_path / "single", llm_cache_path=cache)
    assert single["llm"]["cache"]["hits"] == 3  # the same calls, answered by what the actors stored
    _same_numbers(single, on_ray)
