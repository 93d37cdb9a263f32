"""`adselect eval run` scores the order the endpoint serves (`served`: bid × pCTR, the pipeline's own
serving_order) with revenue@k beside the relevance metrics, and reports exposure by advertiser and
category (Gini, coverage) per system. The demo catalog has bids, advertisers and categories."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from eval.exposure import SLATE_K, exposure, exposure_by_system, gini
from eval.harness import RESULTS
from eval.systems import FAST_SYSTEMS
from tests.conftest import DEMO_DIR
from tests.eval.conftest import run_task

N_IMPRESSIONS = 60


def _logged_demo_impressions(path: Path, *, n: int = N_IMPRESSIONS, seed: int = 0) -> Path:
    """Demo impressions as a logged protocol: the clicked ad + 9 other catalog ads (seeded)."""
    ads = [json.loads(x)["ad_id"] for x in (DEMO_DIR / "ads.jsonl").open()]
    rng = random.Random(seed)
    with path.open("w") as out, (DEMO_DIR / "impressions.jsonl").open() as fh:
        written = 0
        for line in fh:
            r = json.loads(line)
            if not r["history"] or not r["clicked"]:
                continue
            others = rng.sample([a for a in ads if a not in r["clicked"] and a not in r["history"]], 9)
            cands = [*r["clicked"][:1], *others]
            rng.shuffle(cands)
            out.write(json.dumps({**r, "candidates": cands, "clicked": r["clicked"][:1]}) + "\n")
            written += 1
            if written >= n:
                break
    return path


@pytest.fixture(scope="module")
def demo_report(eval_settings, tmp_path_factory):
    work = tmp_path_factory.mktemp("served")
    imps = _logged_demo_impressions(work / "imps.jsonl")
    doc = {"data": {"ads": str(DEMO_DIR / "ads.jsonl"), "impressions": str(imps)}, "no_llm": True, "bootstrap": {"n_boot": 300}}
    out = work / "out"
    return run_task(doc, settings=eval_settings, out=out), out, imps


def test_served_is_the_order_the_endpoint_serves(demo_report, eval_settings) -> None:
    """`served` == the ads select() returns (k = every candidate) from a selector with rank_by=expected_value."""
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.rankers import FastRankers

    _, _, imps = demo_report
    env = prepare_env(eval_settings, ads_path=DEMO_DIR / "ads.jsonl", train_paths=[imps], show_progress=False)
    serving = replace(env.services.selector, rank_by="expected_value")
    rankers = FastRankers(selector=env.services.selector, bm25=None, systems=["default", "served"], rank_by="expected_value")
    moved = 0
    for imp in load_impressions(imps, catalog=env.services.index.row).items:
        r = rankers.run(imp).rankings
        assert r["served"] == [a.ad.ad_id for a in asyncio.run(serving.aselect(rankers.request(imp))).ads]
        moved += r["served"] != r["default"]
    assert moved > 0  # the bids move the order: served is not the relevance order


def test_revenue_per_system_is_the_clicked_bids_in_the_top_k(demo_report) -> None:
    report, out, imps = demo_report
    rev = report["revenue"]
    assert rev["available"] and rev["served_rank_by"] == "expected_value"
    assert set(FAST_SYSTEMS) <= set(rev["metrics"]) and "served" in report["metrics"]
    bids = {json.loads(x)["ad_id"]: json.loads(x)["bid"] for x in (DEMO_DIR / "ads.jsonl").open()}
    clicked = {json.loads(x)["impression_id"]: set(json.loads(x)["clicked"]) for x in imps.open()}
    recs = [json.loads(x) for x in (out / RESULTS).read_text().splitlines()]
    assert len(recs) == report["n_impressions"] == N_IMPRESSIONS
    for s in FAST_SYSTEMS:
        for k in (1, SLATE_K):
            by_hand = sum(sum(bids[a] for a in r["top"][s][:k] if a in clicked[r["impression_id"]]) for r in recs) / len(recs)
            assert rev["metrics"][s][f"revenue@{k}"] == pytest.approx(by_hand), (s, k)
            lo, hi = rev["ci"][s][f"revenue@{k}"]
            assert lo <= by_hand <= hi
    assert rev["paired_vs_default"]["served"]["revenue@1"]["n"] == N_IMPRESSIONS
    md = (out / "report.md").read_text()
    assert "## Revenue" in md and "| served |" in md


def test_exposure_per_system_by_advertiser_and_category(demo_report) -> None:
    report, out, _ = demo_report
    ex = report["exposure"]
    assert ex["k"] == SLATE_K and ex["catalog_ads"] == 300
    recs = {r["impression_id"]: r for r in map(json.loads, (out / RESULTS).read_text().splitlines())}
    catalog = {
        a["ad_id"]: {"advertiser": a["advertiser"], "category": a["category"]} for a in map(json.loads, (DEMO_DIR / "ads.jsonl").open())
    }
    for s in FAST_SYSTEMS:
        e = ex["systems"][s]
        assert e["slates"] == N_IMPRESSIONS and e["impressions"] == N_IMPRESSIONS * SLATE_K
        again = exposure([r["top"][s] for r in recs.values()], catalog)
        assert e["by_advertiser"]["gini"] == pytest.approx(again["by_advertiser"]["gini"]) and e["coverage"] == again["coverage"]
        assert 0 < e["by_category"]["gini"] < 1 and 0 < e["coverage"] < 1
    assert "## Exposure" in (out / "report.md").read_text()


def test_exposure_by_system_hand_computed_gini() -> None:
    """Advertisers served 3, 1 and 0 times: Gini = Σ|xi − xj| / (2 n² mean) = 12 / (2 · 9 · 4/3) = 0.5."""
    catalog = {
        "a1": {"advertiser": "A", "category": "x"},
        "a2": {"advertiser": "A", "category": "y"},
        "b1": {"advertiser": "B", "category": "x"},
        "c1": {"advertiser": "C", "category": "y"},
    }
    records = {"i1": {"top": {"s": ["a1", "a2"]}}, "i2": {"top": {"s": ["a1", "b1"]}}, "i3": {"top": {"t": ["c1"]}}}
    out = exposure_by_system(records, ["i1", "i2", "i3"], ["s", "t"], catalog)
    s = out["s"]
    assert s["slates"] == 2 and s["impressions"] == 4 and s["coverage"] == 3 / 4
    assert s["by_advertiser"]["gini"] == pytest.approx(0.5) == gini([3, 1, 0])
    assert s["by_advertiser"]["top_shares"] == {"A": 0.75, "B": 0.25, "C": 0.0}
    assert s["by_category"]["gini"] == pytest.approx(gini([3, 1])) == pytest.approx(0.25)  # (2·(1·1 + 2·3))/(2·4) − 3/2
    assert out["t"]["slates"] == 1 and out["t"]["by_advertiser"]["gini"] == pytest.approx(2 / 3)  # one of three holds all
    md = render_markdown_exposure({"k": 2, "catalog_ads": 4, "systems": out})
    assert "| s | 2 | 0.7500 | 3 | 0.5000 | A (0.750) |" in md


def render_markdown_exposure(exposure_block: dict) -> str:
    from eval.report_md import _exposure_md

    return "\n".join(_exposure_md(exposure_block))
