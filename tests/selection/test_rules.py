"""Eligibility rules, the publisher blocklist file, and the Chroma prefilter against a real in-memory Chroma."""
from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.errors import DataFileError
from selection.rules import (
    EligibilityPolicy,
    PublisherBlocklist,
    chroma_where,
    filter_eligible,
    is_eligible,
    load_publisher_blocklists,
)
from kernel.settings import Settings
from kernel.types import Ad, Candidate, RequestContext

NOW = datetime(2024, 6, 15, 12, 0, tzinfo=timezone.utc)
CTX = RequestContext(now=NOW, locale="en-GB", device="mobile", publisher_id="pub-1")
AD = Ad("a1", "Trail shoes", "Light and fast.", category="sports", subcategory="running", advertiser="Acme", bid=2.0)


def meta(**kw) -> Ad:
    return replace(AD, metadata=kw)


def test_plain_ad_is_eligible():
    assert is_eligible(AD, CTX, EligibilityPolicy()) == (True, None)


@pytest.mark.parametrize(
    ("policy", "ctx", "reason"),
    [
        (EligibilityPolicy(min_bid=2.5), CTX, "bid_below_min"),
        (EligibilityPolicy(blocked_categories=frozenset({"SPORTS"})), CTX, "blocked_category"),
        (EligibilityPolicy(blocked_categories=frozenset({"running"})), CTX, "blocked_category"),
        (EligibilityPolicy(blocked_advertisers=frozenset({" acme "})), CTX, "blocked_advertiser"),
        (EligibilityPolicy(), replace(CTX, blocked_categories=frozenset({"sports"})), "blocked_category"),
        (EligibilityPolicy(), replace(CTX, blocked_advertisers=frozenset({"Acme"})), "blocked_advertiser"),
        (
            EligibilityPolicy(publishers={"pub-1": PublisherBlocklist(advertisers=frozenset({"acme"}))}),
            CTX,
            "blocked_advertiser",
        ),
        (
            EligibilityPolicy(publishers={"pub-1": PublisherBlocklist(categories=frozenset({"sports"}))}),
            CTX,
            "blocked_category",
        ),
    ],
)
def test_policy_and_request_blocks(policy, ctx, reason):
    assert is_eligible(AD, ctx, policy) == (False, reason)


def test_other_publishers_blocklist_does_not_apply():
    policy = EligibilityPolicy(publishers={"pub-2": PublisherBlocklist(advertisers=frozenset({"acme"}))})
    assert is_eligible(AD, CTX, policy).ok
    assert is_eligible(AD, replace(CTX, publisher_id=None), policy).ok


def test_bid_equal_to_min_is_eligible_and_nan_is_not():
    assert is_eligible(AD, CTX, EligibilityPolicy(min_bid=2.0)).ok
    assert is_eligible(replace(AD, bid=float("nan")), CTX, EligibilityPolicy()) == (False, "bid_below_min")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"start": "2024-06-15"}, None),  # starts today
        ({"start": "2024-06-16"}, "not_started"),
        ({"start": "2024-06-15T12:00:00Z"}, None),
        ({"start": "2024-06-15T12:00:01+00:00"}, "not_started"),
        ({"start": "2024-06-15T13:30:00+02:00"}, None),  # 11:30 UTC
        ({"end": "2024-06-15"}, None),  # a date-only end includes that day
        ({"end": "2024-06-14"}, "expired"),
        ({"end": "2024-06-15T12:00:00"}, "expired"),  # naive = UTC; end is exclusive
        ({"end": "2024-06-15T12:00:01"}, None),
        ({"start": "2024-01-01", "end": "2024-12-31"}, None),
        ({"start": "", "end": None}, None),
        ({"locales": ["en"]}, None),
        ({"locales": ["en_GB", "fr"]}, None),
        ({"locales": ["en-US"]}, "locale_mismatch"),
        ({"locales": "en"}, None),
        ({"locales": []}, None),
        ({"devices": ["Mobile", "tablet"]}, None),
        ({"devices": ["desktop"]}, "device_mismatch"),
        ({"start": "next tuesday"}, "invalid_targeting"),
        ({"end": 20240101}, "invalid_targeting"),
        ({"locales": [1, 2]}, "invalid_targeting"),
    ],
)
def test_targeting(metadata, reason):
    result = is_eligible(meta(**metadata), CTX, EligibilityPolicy())
    assert result == (reason is None, reason)


def test_targeted_ad_is_not_served_when_the_request_does_not_say():
    ctx = RequestContext(now=NOW)
    assert is_eligible(meta(locales=["en"]), ctx, EligibilityPolicy()).reason == "locale_mismatch"
    assert is_eligible(meta(devices=["mobile"]), ctx, EligibilityPolicy()).reason == "device_mismatch"


def test_naive_now_is_utc():
    ctx = replace(CTX, now=NOW.replace(tzinfo=None))
    assert is_eligible(meta(end="2024-06-15T12:00:01Z"), ctx, EligibilityPolicy()).ok


def test_filter_eligible_keeps_order_and_names_reasons():
    ads = [AD, replace(AD, ad_id="a2", advertiser="Blocked"), replace(AD, ad_id="a3"), meta(end="2000-01-01")]
    ads[3] = replace(ads[3], ad_id="a4")
    cands = [Candidate(ad=a, priors={}) for a in ads]
    policy = EligibilityPolicy(blocked_advertisers=frozenset({"blocked"}))
    kept, dropped = filter_eligible(cands, CTX, policy)
    assert [c.ad.ad_id for c in kept] == ["a1", "a3"]
    assert dropped == {"a2": "blocked_advertiser", "a4": "expired"}


def test_publisher_blocklists_file(tmp_path: Path):
    path = tmp_path / "pubs.json"
    path.write_text(json.dumps({"pub-1": {"categories": ["finance"], "advertisers": ["Acme"]}, "pub-2": {}}))
    lists = load_publisher_blocklists(path)
    assert lists["pub-1"] == PublisherBlocklist(frozenset({"finance"}), frozenset({"Acme"}))
    assert lists["pub-2"] == PublisherBlocklist()

    policy = EligibilityPolicy.from_settings(
        Settings(_env_file=None, publisher_blocklists_path=path, min_bid=0.5, blocked_categories=["adult"])
    )
    assert policy.min_bid == 0.5 and policy.blocked_categories == {"adult"}
    assert is_eligible(AD, CTX, policy) == (False, "blocked_advertiser")


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"p": {"categories": "finance"}}', '{"p": {"categorys": []}}', '{"p": [1]}'],
)
def test_publisher_blocklists_file_errors(tmp_path: Path, content: str):
    path = tmp_path / "pubs.json"
    path.write_text(content)
    with pytest.raises(DataFileError) as exc:
        load_publisher_blocklists(path)
    assert exc.value.path == str(path)


def test_chroma_where_shapes():
    assert chroma_where(RequestContext(now=NOW), EligibilityPolicy()) is None
    assert chroma_where(RequestContext(now=NOW), EligibilityPolicy(min_bid=1)) == {"bid": {"$gte": 1.0}}
    where = chroma_where(
        replace(CTX, blocked_advertisers=frozenset({"Zed"})),
        EligibilityPolicy(
            min_bid=0.5,
            blocked_categories=frozenset({"finance"}),
            publishers={"pub-1": PublisherBlocklist(categories=frozenset({"adult"}), advertisers=frozenset({"Acme"}))},
        ),
    )
    assert where == {
        "$and": [
            {"bid": {"$gte": 0.5}},
            {"category": {"$nin": ["adult", "finance"]}},
            {"subcategory": {"$nin": ["adult", "finance"]}},
            {"advertiser": {"$nin": ["Acme", "Zed"]}},
        ]
    }


# --- the prefilter on a real Chroma collection ------------------------------------------------------

CATALOG = [
    Ad(f"c{i}", f"ad {i}", category=cat, subcategory=sub, advertiser=adv, bid=bid)
    for i, (cat, sub, adv, bid) in enumerate(
        [
            ("sports", "running", "Acme", 2.0),
            ("sports", "tennis", "Zed", 0.4),
            ("finance", "loans", "Bank", 1.0),
            ("finance", "cards", "Acme", 3.0),
            ("travel", "adult", "Trips", 1.5),
            ("Sports", "golf", "acme", 1.2),  # differs only in case: passes the prefilter, not is_eligible
            ("travel", "", "", 0.5),
        ]
    )
]


@pytest.fixture(scope="module")
def collection():
    chromadb = pytest.importorskip("chromadb")
    from chromadb.config import Settings as ChromaSettings

    from retrieval.store import ad_to_metadata

    client = chromadb.EphemeralClient(settings=ChromaSettings(anonymized_telemetry=False))
    col = client.create_collection(f"rules-{uuid.uuid4().hex[:8]}", embedding_function=None)
    col.add(
        ids=[a.ad_id for a in CATALOG],
        embeddings=[[1.0, float(i), 0.5] for i in range(len(CATALOG))],
        metadatas=[ad_to_metadata(a) for a in CATALOG],
    )
    return col


blocks = st.frozensets(st.sampled_from(["sports", "finance", "adult", "loans", "golf", "Acme", "Zed", "Bank"]), max_size=3)


@settings(max_examples=40, deadline=None)
@given(
    min_bid=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.5]),
    cats=blocks,
    advs=blocks,
    req_cats=blocks,
    req_advs=blocks,
)
def test_chroma_prefilter_never_drops_an_eligible_ad(collection, min_bid, cats, advs, req_cats, req_advs):
    policy = EligibilityPolicy(min_bid=min_bid, blocked_categories=cats, blocked_advertisers=advs)
    ctx = RequestContext(now=NOW, blocked_categories=req_cats, blocked_advertisers=req_advs)
    where = chroma_where(ctx, policy)
    got = collection.get(where=where) if where is not None else collection.get()
    passed = set(got["ids"])
    eligible = {a.ad_id for a in CATALOG if is_eligible(a, ctx, policy).ok}
    assert eligible <= passed
    # and the prefilter is exact for everything but case differences
    exact_case_miss = {a.ad_id for a in CATALOG if a.ad_id in passed and a.ad_id not in eligible}
    assert exact_case_miss <= {"c5"}


def test_an_ad_without_a_category_is_blocked_by_its_extracted_category():
    from agent.understanding import AdUnderstanding, with_understanding
    from selection.rules import BLOCKED_CATEGORY, EligibilityTable

    record = AdUnderstanding(category="Gambling", summary="An online casino.")
    bare = replace(AD, category="", subcategory="")
    understood = with_understanding(bare, record)
    own = with_understanding(AD, record)  # the advertiser's own category wins over the extracted one
    policy = EligibilityPolicy(blocked_categories=frozenset({"gambling"}))
    assert understood.metadata["understanding"]["category_source"] == "extracted"
    assert is_eligible(bare, CTX, policy).ok
    assert is_eligible(understood, CTX, policy) == (False, BLOCKED_CATEGORY)
    assert is_eligible(own, CTX, policy).ok
    ads = [bare, understood, own]
    keep, reasons = EligibilityTable.from_ads(ads).check(np.arange(3), ads, CTX, policy)
    assert keep.tolist() == [True, False, True] and reasons == {1: BLOCKED_CATEGORY}
