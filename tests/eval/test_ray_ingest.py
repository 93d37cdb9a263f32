"""`adselect ingest --ray`: the catalog embedded by actors of a local Ray (2 CPUs) is the catalog the
single-process ingest stores (same ids, vectors equal to float32 precision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from adselect.cli import app
from kernel.settings import REPO_ROOT, Settings

import ray  # noqa: E402 - a real dependency (the ray extra): missing, the tests fail, never skip

DEMO_ADS = REPO_ROOT / "data" / "demo" / "ads.jsonl"
DEMO_HISTORY = REPO_ROOT / "data" / "demo" / "impressions.jsonl"


def _index(data_dir: Path):
    from selection.services import make_store

    return make_store(Settings(_env_file=None, data_dir=data_dir)).load_index()


def test_ingest_on_ray_stores_the_single_process_vectors_and_behaviour_tables(tmp_path: Path, monkeypatch) -> None:
    """The catalog embedded by actors, and the behaviour of --history counted by actors (merged in the
    driver): the same vectors, and every behaviour table equal to the single-process one."""
    from retrieval.behaviour import BehaviourStats
    from selection.services import behaviour_dir
    from tests.eval.test_ray_behaviour import assert_same_tables

    monkeypatch.setenv("ADSELECT_SEQUENCE_ENABLED", "false")  # the sequence model does not train on Ray
    for name, extra in (("single", []), ("ray", ["--ray"])):
        res = CliRunner().invoke(
            app, ["--log-format", "text", "ingest", "--ads", str(DEMO_ADS), "--history", str(DEMO_HISTORY), "--data-dir", str(tmp_path / name), *extra],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert "300 added" in res.output
        assert ("counted on 2 Ray actors" in res.output) == bool(extra), res.output
    assert not ray.is_initialized()  # the command's Ray is shut down with it
    a, b = _index(tmp_path / "single"), _index(tmp_path / "ray")
    assert list(a.ids) == list(b.ids)
    order = [b.row[i] for i in a.ids]
    assert np.allclose(a.vectors, b.vectors[order], atol=1e-5)
    tables = [BehaviourStats.load(behaviour_dir(Settings(_env_file=None, data_dir=tmp_path / n)), list(a.ids)) for n in ("single", "ray")]
    assert tables[0] is not None and tables[1] is not None and tables[0].n_histories > 0
    assert_same_tables(tables[0], tables[1])
