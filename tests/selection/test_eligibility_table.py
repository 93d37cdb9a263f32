"""The vectorised eligibility check (EligibilityTable) answers exactly what is_eligible() answers, row by row."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.types import Ad, RequestContext
from selection.rules import EligibilityPolicy, EligibilityTable, PublisherBlocklist, is_eligible

NAMES = ["Sports", "sports ", "SPORTS", "running", "Books", "", " ", "Acme", "acme", "Zed"]
TARGETING = [
    {},
    {"start": "2030-01-01"},
    {"end": "2020-01-01"},
    {"end": "not a date"},
    {"locales": ["en"]},
    {"locales": ["fr-FR"]},
    {"devices": ["Mobile"]},
    {"devices": 7},
    {"start": "", "locales": []},
]

ads_st = st.lists(
    st.builds(
        lambda i, c, s, a, bid, m: Ad(f"ad{i}", "t", category=c, subcategory=s, advertiser=a, bid=bid, metadata=m),
        st.integers(0, 10**6),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.sampled_from([0.0, 0.5, 1.0, 2.0, float("nan")]),
        st.sampled_from(TARGETING),
    ),
    min_size=1,
    max_size=30,
)
names_st = st.frozensets(st.sampled_from(NAMES), max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    ads=ads_st,
    min_bid=st.sampled_from([0.0, 0.5, 1.5]),
    cats=names_st,
    advs=names_st,
    ctx_cats=names_st,
    ctx_advs=names_st,
    pub_cats=names_st,
    locale=st.sampled_from([None, "en-GB", "fr"]),
    device=st.sampled_from([None, "mobile"]),
    data=st.data(),
)
def test_check_matches_is_eligible(ads, min_bid, cats, advs, ctx_cats, ctx_advs, pub_cats, locale, device, data):
    policy = EligibilityPolicy(
        min_bid=min_bid, blocked_categories=cats, blocked_advertisers=advs, publishers={"p": PublisherBlocklist(categories=pub_cats)}
    )
    ctx = RequestContext(
        now=datetime(2025, 6, 1, tzinfo=timezone.utc),
        locale=locale,
        device=device,
        publisher_id="p",
        blocked_categories=ctx_cats,
        blocked_advertisers=ctx_advs,
    )
    rows = np.asarray(data.draw(st.lists(st.integers(0, len(ads) - 1), max_size=40)), dtype=np.int64)
    keep, reasons = EligibilityTable.from_ads(ads).check(rows, ads, ctx, policy)
    expected = [is_eligible(ads[r], ctx, policy) for r in rows.tolist()]
    assert keep.tolist() == [ok for ok, _ in expected]
    assert reasons == {int(r): why for r, (ok, why) in zip(rows.tolist(), expected) if not ok}
