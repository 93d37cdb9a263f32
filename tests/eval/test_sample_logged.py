"""`adselect eval sample-logged`: clicked + random negatives for users outside the eval sets, seeded."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from adselect.cli import app
from eval.data import load_impressions
from eval.sample_logged import SampleOptions, meta_path, sample_logged


def _catalog(tmp_path: Path, n: int = 60) -> Path:
    path = tmp_path / "ads.jsonl"
    path.write_text("".join(json.dumps({"ad_id": str(i), "title": f"Product {i}"}) + "\n" for i in range(n)))
    return path


def _full(tmp_path: Path, n: int = 30) -> Path:
    rows = []
    for u in range(n):
        rows.append({"impression_id": f"dev-{u}", "user_id": f"u{u}", "history": [str(u), str(u + 1), "unknown-id"], "candidates": [], "clicked": [str(u + 2)]})
    rows.append({"impression_id": "dev-x", "user_id": "ux", "history": ["1"], "candidates": [], "clicked": ["not-in-catalog"]})
    path = tmp_path / "full.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_draws_eligible_users_with_clicked_plus_random_negatives(tmp_path: Path) -> None:
    ads, full = _catalog(tmp_path), _full(tmp_path)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"impression_id": f"e{u}", "user_id": f"u{u}", "clicked": ["1"]}) + "\n" for u in (5, 6, 7)))
    out = tmp_path / "var" / "logged.jsonl"
    opts = SampleOptions(ads=ads, impressions=full, out=out, exclude=[held], n=10, n_random=7, skip=3, seed=1)
    meta = sample_logged(opts)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10 and meta["counts"]["written"] == 10
    assert meta["counts"] == {
        "read": 31, "skipped_head": 3, "excluded_user": 3, "has_candidates": 0, "not_in_catalog": 1, "eligible": 24, "written": 10,
    }  # fmt: skip
    for r in rows:
        u = int(r["user_id"][1:])
        assert u >= 3 and u not in (5, 6, 7)
        assert r["clicked"] == [str(u + 2)] and r["clicked"][0] in r["candidates"] and len(r["candidates"]) == 8
        negatives = set(r["candidates"]) - set(r["clicked"])
        assert len(negatives) == 7 and not negatives & set(r["history"]) and "unknown-id" not in r["history"]
    assert any(r["candidates"][0] != r["clicked"][0] for r in rows)  # shuffled, not clicked-first
    assert meta["exclude"][0]["sha256"] and meta["excluded_users"] == 3 and "--skip 3" in meta["command"]
    assert json.loads(meta_path(out).read_text()) == meta
    # the eval loader takes every line as a logged-candidate impression
    loaded = load_impressions(out, catalog={str(i): i for i in range(60)})
    assert len(loaded.items) == 10 and all(i.protocol == "logged" for i in loaded.items)
    # same seed, same file; another seed, another draw
    again = tmp_path / "again.jsonl"
    sample_logged(SampleOptions(**{**opts.__dict__, "out": again}))
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.jsonl"
    sample_logged(SampleOptions(**{**opts.__dict__, "out": other, "seed": 2}))
    assert other.read_text() != out.read_text()


def test_cli_writes_the_file_and_fails_cleanly_when_nothing_is_eligible(tmp_path: Path) -> None:
    ads, full = _catalog(tmp_path), _full(tmp_path, n=5)
    out = tmp_path / "logged.jsonl"
    res = CliRunner().invoke(
        app, ["eval", "sample-logged", "--ads", str(ads), "--impressions", str(full), "--n", "3", "--n-random", "4", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 3 and "sample-logged" in res.output
    res = CliRunner().invoke(
        app, ["eval", "sample-logged", "--ads", str(ads), "--impressions", str(full), "--skip", "100", "--out", str(tmp_path / "none.jsonl")]
    )
    assert res.exit_code == 2 and "no eligible impression" in res.output
