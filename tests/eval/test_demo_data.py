"""The committed demo data: reproducible from its generator, canonical, and internally consistent."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from retrieval.records import iter_impressions, read_ads

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


@pytest.fixture(scope="module")
def ads():
    return read_ads(DEMO / "ads.jsonl")


@pytest.fixture(scope="module")
def impressions():
    return [rec for _, rec in iter_impressions(DEMO / "impressions.jsonl")]


def test_generator_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(DEMO / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("ads.jsonl", "impressions.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), f"{name} is stale: rerun generate.py"


def test_catalog_shape(ads):
    assert (DEMO / "ads.jsonl").stat().st_size < 200_000
    assert 250 <= len(ads) <= 350
    by_category = Counter(a.category for a in ads)
    assert len(by_category) >= 12
    for category in by_category:
        assert len({a.advertiser for a in ads if a.category == category}) >= 3, category
    assert all(0.2 <= a.bid <= 3.0 and a.landing_url.startswith("https://") and a.text and a.subcategory for a in ads)
    assert sum("%" in a.text for a in ads) > 50 and sum("$" in a.text for a in ads) > 50


def test_impressions_are_consistent_with_the_catalog(ads, impressions):
    ids = {a.ad_id for a in ads}
    assert 450 <= len(impressions) <= 550
    assert len({r.impression_id for r in impressions}) == len(impressions)
    assert [r.timestamp for r in impressions] == sorted(r.timestamp for r in impressions)
    for r in impressions:
        assert set(r.history) <= ids and len(set(r.history)) == len(r.history)
        assert len(r.clicked) == 1 and r.clicked[0] in ids and r.clicked[0] not in r.history
        if r.candidates:
            assert len(r.candidates) == 10 and len(set(r.candidates)) == 10
            assert set(r.candidates) <= ids and r.clicked[0] in r.candidates
    assert 0.3 < sum(bool(r.candidates) for r in impressions) / len(impressions) < 0.7


def test_histories_are_coherent(ads, impressions):
    category = {a.ad_id: a.category for a in ads}
    pairs = [(x, y) for r in impressions for x, y in zip(r.history, r.history[1:])]
    same = sum(category[x] == category[y] for x, y in pairs) / len(pairs)
    assert same > 0.7  # a random pair over 12 categories would agree ~8% of the time


def test_injection_ads_and_events(ads):
    injected = read_ads(DEMO / "injection_ads.jsonl")
    events = json.loads((DEMO / "injection_events.json").read_text(encoding="utf-8"))
    assert len(injected) >= 10 and len(events) >= 10
    assert not {a.ad_id for a in injected} & {a.ad_id for a in ads}
    canaries = [a.metadata["canary"] for a in injected] + [e["canary"] for e in events]
    assert len(set(canaries)) == len(canaries)
    for ad in injected:
        visible = " ".join([ad.title, ad.text, ad.advertiser, ad.category, ad.subcategory])
        assert ad.metadata["canary"] in visible, ad.ad_id
    for event in events:
        assert event["canary"] in event["event"] and event["id"] and event["technique"]
