"""End to end: `adselect eval` on slices of the real dev files, the report's shape, resume, the LLM path."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adselect.cli import app
from eval.harness import RESULTS, ResumeMismatch
from eval.report import metric_names
from eval.systems import SYSTEMS
from tests.eval.conftest import GAMES, MIND, run_task

ALL_METRICS = metric_names([20, 50, 100])
LOGGED_METRICS = [m for m in ALL_METRICS if not m.startswith("recall@")]


def _check_shape(report: dict, *, logged_only: bool) -> None:
    assert set(report) >= {"metrics", "n_impressions", "skipped", "config", "provenance"}
    assert list(report["metrics"]) == list(SYSTEMS)  # every system present, in registry order
    for system, metrics in report["metrics"].items():
        assert list(metrics) == ALL_METRICS, system
        for name, value in metrics.items():
            assert value is None or 0.0 <= value <= 1.0, (system, name, value)
        if logged_only:
            assert all(metrics[m] is None for m in ALL_METRICS if m.startswith("recall@"))
    prov = report["provenance"]
    assert len(prov["git"]["commit"] or "") == 40
    assert prov["data"]["ads"]["sha256"] and prov["data"]["impressions"]["sha256"]
    assert len(prov["config_sha256"]) == 64
    assert prov["fusion_weights"]["path"] is None or prov["fusion_weights"]["sha256"]


@pytest.fixture(scope="session")
def games_report(games_slice, eval_data_dir: Path, tmp_path_factory) -> tuple[dict, Path]:
    """The real command line on the first 100 sampled dev impressions (LLM off)."""
    out = tmp_path_factory.mktemp("games-report")
    args = [
        "eval", "run", "--ads", str(games_slice["ads"]), "--impressions", str(games_slice["impressions"]),
        "--limit", str(games_slice["limit"]), "--no-llm", "--no-progress", "--data-dir", str(eval_data_dir), "--out", str(out),
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text()), out


def test_games_slice_report_shape_and_default_beats_random(games_report) -> None:
    report, out = games_report
    _check_shape(report, logged_only=True)
    assert report["n_impressions"] == 100 and sum(report["skipped"].values()) == 0
    m = report["metrics"]
    assert m["default"]["ndcg@10"] > m["random"]["ndcg@10"] + 0.1
    assert m["default"]["auc"] > 0.6 and 0.4 < m["random"]["auc"] < 0.6
    assert m["llm"]["ndcg@10"] is None and report["not_run"] == {"llm": "no_llm", "default+llm": "no_llm"}
    assert m["sequence"]["ndcg@10"] > m["random"]["ndcg@10"] and report["n"]["sequence"] == 100  # the trained model alone
    lo, hi = report["ci"]["default"]["ndcg@10"]
    assert lo <= m["default"]["ndcg@10"] <= hi
    diff = report["paired_vs_default"]["random"]["ndcg@10"]
    assert diff["diff"] < 0 and diff["hi"] < 0 and diff["n"] == 100
    assert (out / "report.md").read_text().startswith("# Eval report")
    assert (out / "ndcg_at_k.png").stat().st_size > 1000
    assert report["speed"]["fast"]["impressions"] == 100


def test_a_catalog_without_bids_says_so_instead_of_reporting_zeros(games_report) -> None:
    report, out = games_report
    rev = report["revenue"]
    assert rev["available"] is False and "no ad in the catalog has a bid" in rev["reason"]
    assert "metrics" not in rev
    assert "Not reported: no ad in the catalog has a bid" in (out / "report.md").read_text()


def test_mind_report_covers_every_system(mind_report) -> None:
    report, out = mind_report
    _check_shape(report, logged_only=True)
    assert report["n_impressions"] == 54
    assert report["metrics"]["default"]["auc"] > report["metrics"]["random"]["auc"]
    for s in ("random", "popularity", "bm25", "dense", "covisit", "default"):
        assert all(report["metrics"][s][k] is not None for k in ("auc", "mrr", "ndcg@5", "ndcg@10"))


def test_rerun_reuses_the_catalog_and_behaviour(eval_settings, tmp_path: Path) -> None:
    """A data dir of its own: other tests of the session retrain the shared dir's sequence model with their own
    histories and settings, so "the same run again" is only well defined here."""
    settings = eval_settings.model_copy(update={"data_dir": tmp_path / "var"})
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")}, "no_llm": True}
    first = run_task(doc, settings=settings, out=tmp_path / "first")
    assert first["speed"]["setup"]["reused"] == {"catalog": False, "behaviour": False, "sequence": False}
    again = run_task(doc, settings=settings, out=tmp_path / "again")
    assert again["speed"]["setup"]["reused"] == {"catalog": True, "behaviour": True, "sequence": True}
    assert again["metrics"] == first["metrics"]


def test_full_catalog_protocol_reports_candidate_recall(games_slice, eval_settings, tmp_path: Path) -> None:
    """Same users, `candidates: []`: retrieve from the (slice) catalog, then rank."""
    rows = [json.loads(x) for x in Path(games_slice["impressions"]).read_text().splitlines()[:40]]
    path = tmp_path / "full.jsonl"
    path.write_text("".join(json.dumps({**r, "candidates": []}) + "\n" for r in rows))
    doc = {"data": {"ads": str(games_slice["ads"]), "impressions": str(path)}, "no_llm": True, "protocol": {"use_chroma": False}}
    report = run_task(doc, settings=eval_settings, out=tmp_path / "out")
    _check_shape(report, logged_only=False)
    cs = report["candidate_stage"]
    assert cs["n"] == 40 and 0 <= cs["recall@20"] <= cs["recall@50"] <= cs["recall@100"] <= cs["coverage"] <= 1
    assert report["metrics"]["default"]["recall@50"] == pytest.approx(cs["recall@50"])
    assert report["protocols"] == {"full": 40}


def test_resume_finishes_an_interrupted_run(eval_settings, tmp_path: Path) -> None:
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl"), "limit": 20}, "no_llm": True}
    full = run_task(doc, settings=eval_settings, out=tmp_path / "a")
    out = tmp_path / "b"
    run_task(doc, settings=eval_settings, out=out)
    lines = (out / RESULTS).read_text().splitlines(keepends=True)
    (out / RESULTS).write_text("".join(lines[:7]) + lines[7][:25])  # killed mid-line
    resumed = run_task(doc, settings=eval_settings, out=out, resume=True)
    assert resumed["speed"]["fast"]["impressions"] == 13
    assert resumed["metrics"] == full["metrics"]
    assert len((out / RESULTS).read_text().splitlines()) == 20
    with pytest.raises(ResumeMismatch):
        run_task({**doc, "systems": ["random", "default"]}, settings=eval_settings, out=out, resume=True)


def test_resume_refuses_results_without_the_run_file_that_says_whose_they_are(eval_settings, tmp_path: Path) -> None:
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl"), "limit": 5}, "no_llm": True}
    run_task({**doc, "systems": ["random", "default"]}, settings=eval_settings, out=tmp_path)
    (tmp_path / "run.json").unlink()  # e.g. killed before the run file was complete (it is now written atomically)
    with pytest.raises(ResumeMismatch):
        run_task(doc, settings=eval_settings, out=tmp_path, resume=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_llm_systems_position_bias_and_cache_with_a_fake_llm(eval_settings, fake_llm, tmp_path: Path) -> None:
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "llm": {"sample": 4, "max_candidates": 5, "model": "fake-ranking"},
    }
    cache = tmp_path / "cache" / "llm_cache.sqlite"  # empty: the first run must miss every call
    report = run_task(doc, settings=eval_settings, out=tmp_path / "a", llm_inner=fake_llm, llm_cache_path=cache)
    assert report["n"]["llm"] == 4 and report["n"]["default+llm"] == 4 and report["n"]["default"] == 54
    assert report["llm"]["summary"]["llm_used"] == 4
    assert report["paired_vs_default"]["llm"]["ndcg@10"]["n"] == 4
    assert set(report["llm"]["sample_metrics"]["metrics"]) == {"default", "llm", "default+llm"}
    pb = report["position_bias"]["orderings"]
    # The fake always picks the last id it is shown: reversing the list always changes its pick.
    assert pb["reversed"]["top_pick_changed_rate"] == 1.0 and pb["prior"]["mean_top_pick_position"] == 4
    # 4 impressions × (prior, reversed, shuffled): 12 calls, every one a miss answered by the fake
    assert report["llm"]["cache"] == {"hits": 0, "misses": 12, "errors": 0, "hit_rate": 0.0}
    assert len(fake_llm.calls) == 12 and report["llm"]["cache_entries"] == 12 and report["provenance"]["prompt"]["sha256"]
    assert (tmp_path / "a" / "position_bias.png").exists()
    ex = report["exposure"]  # the LLM systems' exposure over the sample, default on the same sample beside them
    assert ex["systems"]["llm"]["slates"] == ex["systems"]["default+llm"]["slates"] == ex["sample"]["default"]["slates"] == 4
    assert ex["systems"]["default"]["slates"] == 54 and "## Exposure" in (tmp_path / "a" / "report.md").read_text()
    again = run_task(doc, settings=eval_settings, out=tmp_path / "b", llm_inner=fake_llm, llm_cache_path=cache)
    assert len(fake_llm.calls) == 12  # identical re-run: every call answered from the disk cache
    assert again["llm"]["cache"] == {"hits": 12, "misses": 0, "errors": 0, "hit_rate": 1.0}
    assert again["metrics"] == report["metrics"]


def test_degraded_llm_calls_fall_back_to_the_prior_order(eval_settings, fake_llm, tmp_path: Path) -> None:
    fake_llm.enqueue("not json at all", "still not json", "nope", "no")
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "llm": {"sample": 2, "position_bias": False, "cache": False, "model": "fake-garbage"},
        "systems": ["default", "llm", "default+llm"],
    }
    report = run_task(doc, settings=eval_settings, out=tmp_path, llm_inner=fake_llm)
    s = report["llm"]["summary"]
    assert s["llm_used"] == 0 and sum(s["degraded"].values()) == 2
    sample = report["llm"]["sample_metrics"]["metrics"]
    assert sample["llm"] == sample["default"] == sample["default+llm"]


@pytest.mark.llm_server
def test_real_local_llm_on_three_impressions(local_llm_url: str, eval_settings, tmp_path: Path) -> None:
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "systems": ["random", "default", "llm", "default+llm"],
        "llm": {"url": local_llm_url, "sample": 3, "position_bias": False, "max_candidates": 8, "timeout_s": 120},
    }
    report = run_task(doc, settings=eval_settings, out=tmp_path / "a")
    assert report["n"]["llm"] == 3 and report["n"]["default+llm"] == 3
    assert report["llm"]["cache"]["hits"] + report["llm"]["cache"]["misses"] == 3
    assert report["provenance"]["model"] == eval_settings.llm_model
    again = run_task(doc, settings=eval_settings, out=tmp_path / "b")
    assert again["llm"]["cache"] == {"hits": 3, "misses": 0, "errors": 0, "hit_rate": 1.0}
    assert again["metrics"] == report["metrics"]


def test_games_files_are_where_the_tasks_expect_them() -> None:
    assert (GAMES / "impressions_full_dev.jsonl").is_file() and (MIND / "ads.jsonl").is_file()


def test_default_is_the_endpoints_decision_ranking(games_report, games_slice, eval_settings) -> None:
    """The fast path reads the prior stage; with the LLM off that is exactly Decision.ranking of select()."""
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.rankers import FastRankers

    env = prepare_env(eval_settings, ads_path=games_slice["ads"], train_paths=[games_slice["impressions"]], show_progress=False)
    sel = env.services.selector
    items = load_impressions(games_slice["impressions"], catalog=env.services.index.row, limit=20).items
    rankers = FastRankers(selector=sel, bm25=None, systems=["default"])
    for imp in items:
        assert rankers.run(imp).rankings["default"] == asyncio.run(sel.aselect(rankers.request(imp))).ranking


def test_forked_fast_path_matches_in_process(mind_report, eval_settings, tmp_path: Path) -> None:
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "no_llm": True,
        "protocol": {"workers": 2},
    }
    report = run_task(doc, settings=eval_settings, out=tmp_path)
    assert report["speed"]["fast"]["workers"] == 2
    assert report["metrics"] == mind_report[0]["metrics"]
    ids = [json.loads(x)["impression_id"] for x in (tmp_path / RESULTS).read_text().splitlines()]
    assert ids == [json.loads(x)["impression_id"] for x in (MIND / "impressions_dev.jsonl").read_text().splitlines()]


# ---- calibration and rewrites in the report -------------------------------------------------------
def test_reports_carry_the_default_systems_calibration(mind_report, games_report) -> None:
    report, out = mind_report
    cal = report["calibration"]["default"]
    n_candidates = sum(len(json.loads(x)["candidates"]) for x in (MIND / "impressions_dev.jsonl").read_text().splitlines())
    assert cal["impressions"] == 54 and cal["rows"] == n_candidates
    assert sum(b["n"] for b in cal["reliability"]) == cal["rows"]
    assert 0 < cal["base_rate"] < 1 and cal["logloss"] > 0 and cal["logloss_base_rate"] > 0
    # LLM systems not run; the shipped weights' pCTR is prior-corrected, so default is also judged on the
    # sampled-row scale it was fitted on, over the same rows
    from eval.report import SAMPLED_SCALE

    assert set(report["calibration"]) == {"default", SAMPLED_SCALE}
    sampled = report["calibration"][SAMPLED_SCALE]
    assert sampled["rows"] == cal["rows"] and sampled["mean_predicted"] > cal["mean_predicted"]
    assert "## Calibration" in (out / "report.md").read_text()
    assert (out / "reliability.png").stat().st_size > 1000 and "reliability.png" in report["plots"]
    games = games_report[0]["calibration"]["default"]
    assert games["rows"] == 100 * 20 and games["base_rate"] == pytest.approx(0.05)
    games_sampled = games_report[0]["calibration"][SAMPLED_SCALE]  # 1 click in 20 rows: the scale the fit was made on
    assert 0.5 < games_sampled["sum_p_over_sum_y"] < 2 and games["sum_p_over_sum_y"] < 0.2


def test_fast_path_pctr_is_the_endpoints_pctr(games_slice, eval_settings) -> None:
    """fusion.pctr of the fast path's kept scores == RankedAd.pctr of select() with the LLM off."""
    import numpy as np

    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.rankers import FastRankers

    env = prepare_env(eval_settings, ads_path=games_slice["ads"], train_paths=[games_slice["impressions"]], show_progress=False)
    sel = env.services.selector
    items = load_impressions(games_slice["impressions"], catalog=env.services.index.row, limit=10).items
    rankers = FastRankers(selector=sel, bm25=None, systems=["default"])
    for imp in items:
        res = rankers.run(imp)
        d = asyncio.run(sel.aselect(rankers.request(imp)))
        assert [a.pctr for a in d.ads] == np.round(sel.fusion.pctr(np.array(res.scores)), 6).tolist()
        assert [d.ads[k].ad.ad_id for k in res.clicked_at] == sorted(imp.clicked, key=[a.ad.ad_id for a in d.ads].index)


class FakeCopyLLM:
    """ChatLLMLike: ranks the candidates in the order sent (the prior order), and answers with the next
    (justification, headline, description) of `copies`, cycling."""

    def __init__(self, copies: list[tuple[str, str, str]], model: str):
        self.copies, self.model, self.calls = copies, model, 0

    def _answer(self, schema):
        from agent.llm import Completion

        ids = schema["properties"]["ranking"]["items"]["enum"]
        justification, headline, description = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        text = json.dumps({"ranking": ids, "justification": justification, "headline": headline, "description": description})
        return Completion(text=text, prompt_tokens=10, completion_tokens=5, latency_ms=1.0, model=self.model, finish_reason="stop")

    def complete(self, messages, *, schema, timeout_s):
        return self._answer(schema)

    async def acomplete(self, messages, *, schema, timeout_s):
        return self._answer(schema)


def test_rewrite_run_reports_served_copy_and_refusals_by_reason(eval_settings, tmp_path: Path) -> None:
    import uuid

    copies = [
        ("You read similar stories", "Read the full story", "A closer look at this news story"),  # passes
        ("Use code ZX91 for this", "Read it", "More at www.example.com"),  # text guard + validator refuse
        ("You read similar stories", "H" * 40, "Too long a headline"),  # dropped by the parser (too long)
    ]
    llm = FakeCopyLLM(copies, model=f"fake-copy-{uuid.uuid4().hex[:8]}")
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "systems": ["default", "llm", "default+llm"],
        "llm": {"sample": 6, "max_candidates": 5, "model": llm.model, "rewrite": True, "position_bias": False, "concurrency": 1},
    }
    report = run_task(doc, settings=eval_settings, out=tmp_path, llm_inner=llm)
    rw = report["rewrites"]
    assert (rw["requested"], rw["answered"], rw["served"], rw["copy_ok"]) == (6, 6, 2, 2)
    # the parser's reason for dropping the long headline reaches the report by name: nothing is discarded unexplained
    assert rw["share_served"] == pytest.approx(2 / 6) and rw["copy_discarded"] == 0
    assert rw["violation_counts"] == {"headline_too_long": 2, "justification_foreign_code": 2, "url": 2}
    assert rw["violations"]["url"] == pytest.approx(2 / 6)
    md = (tmp_path / "report.md").read_text()
    assert "## Rewrites" in md and "| url | 2 | 0.333 |" in md
    # the shipped weights give the LLM no say: default+llm's pCTR is the default's on the same impressions
    cal = report["calibration"]["default+llm"]
    assert cal["impressions"] == 6 and cal["default_on_same_impressions"]["impressions"] == 6
    assert cal["logloss"] == pytest.approx(cal["default_on_same_impressions"]["logloss"], rel=1e-4)
    assert report["calibration"]["default"]["impressions"] == 54


def test_rewrite_is_part_of_the_llm_cache_key(eval_settings, fake_llm, tmp_path: Path) -> None:
    import uuid

    from eval.config import LLMSpec
    from eval.llm_phase import decoding_params

    assert decoding_params(LLMSpec(rewrite=True)) != decoding_params(LLMSpec(rewrite=False))
    fake_llm.model = f"fake-ranking-{uuid.uuid4().hex[:8]}"
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "systems": ["default", "default+llm"],
        "llm": {"sample": 3, "max_candidates": 4, "model": fake_llm.model, "position_bias": False},
    }
    off = run_task(doc, settings=eval_settings, out=tmp_path / "off", llm_inner=fake_llm)
    assert off["llm"]["cache"]["misses"] == 3 and off["rewrites"] is None
    on = run_task({**doc, "llm": {**doc["llm"], "rewrite": True}}, settings=eval_settings, out=tmp_path / "on", llm_inner=fake_llm)
    assert on["llm"]["cache"]["hits"] == 0 and on["llm"]["cache"]["misses"] == 3 and len(fake_llm.calls) == 6
    assert on["rewrites"]["requested"] == 3
    again = run_task({**doc, "llm": {**doc["llm"], "rewrite": True}}, settings=eval_settings, out=tmp_path / "again", llm_inner=fake_llm)
    assert again["llm"]["cache"]["hits"] == 3 and again["rewrites"] == on["rewrites"]
