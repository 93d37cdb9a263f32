"""GET /metrics (Prometheus text, one registry per app), and the copy validator seen through the endpoint:
a rewrite that breaks a rule is never served, the advertiser's copy is, and the refusal is counted."""
from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.protocol import SelectResponseBody
from tests.security.conftest import reranker_for, services_with
from tests.security.fakes import answer
from tests.utils.fakes import FakeQueueLLM

TOP = "run-004"  # "Stride Lite neutral shoe | Stridewell": "... Free shipping on orders over $75."
# The copy is written for the ad the service expects to serve (the first of the LLM-free order): TOP, the only
# running ad and the highest bid among these, for a runner's history, whatever the fusion weights.
REWRITE_CANDIDATES = [TOP, "pet-002", "cof-009", "pet-007", "kit-012"]
CANDIDATES = ["run-004", "run-002", "run-003", "run-005", "run-006"]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def select(client: TestClient, **fields) -> SelectResponseBody:
    body = {"user_id": f"u-{uuid.uuid4().hex}", "history": ["run-001", "run-009"], "k": 3, "use_llm": False, **fields}
    r = client.post("/v1/select", json=body)
    assert r.status_code == 200, r.text
    return SelectResponseBody.model_validate(r.json())


VIOLATIONS = [
    ("price not in the source", "Stride Lite now $49", "Built for long miles, from Stridewell.", "ungrounded_number"),
    ("url", "Stride Lite neutral shoe", "Order at stridewell-deals.com for long miles.", "url"),
    ("guaranteed", "Guaranteed comfort", "The Stride Lite neutral shoe, built for long miles.", "ungrounded_claim"),
    ("promo code from nowhere", "Stride Lite: code RUN25", "Built for long miles: the Stride Lite neutral shoe.", "foreign_code"),
]


@pytest.mark.parametrize(("case", "headline", "description", "reason"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_violating_rewrite_serves_the_original_and_is_counted(demo_settings, demo_services, case, headline, description, reason):
    llm = FakeQueueLLM().enqueue(answer([TOP], justification="You run long distances.", headline=headline, description=description))
    svc = services_with(demo_services, reranker=reranker_for(llm, demo_settings))
    with TestClient(create_app(demo_settings, services=svc)) as client:
        d = select(client, candidates=REWRITE_CANDIDATES, k=len(REWRITE_CANDIDATES), use_llm=True, deadline_ms=5000)
        text = client.get("/metrics").text
    assert d.llm_used and not d.degraded
    top = next(a for a in d.ads if a.ad_id == TOP)
    assert top.copy_ == top.original
    assert top.original.headline == "Stride Lite neutral shoe | Stridewell"
    assert value(text, "adselect_copy_rejections_total", reason=reason) == 1.0


def test_valid_rewrite_is_served(demo_settings, demo_services):
    rewrite = ("Stride Lite neutral shoe", "Built for long miles, with free shipping on orders over $75.")
    llm = FakeQueueLLM().enqueue(answer([TOP], justification="You run long distances.", headline=rewrite[0], description=rewrite[1]))
    svc = services_with(demo_services, reranker=reranker_for(llm, demo_settings))
    with TestClient(create_app(demo_settings, services=svc)) as client:
        d = select(client, candidates=REWRITE_CANDIDATES, k=len(REWRITE_CANDIDATES), use_llm=True, deadline_ms=5000)
        text = client.get("/metrics").text
    top = next(a for a in d.ads if a.ad_id == TOP)
    assert (top.copy_.headline, top.copy_.description) == rewrite
    assert top.justification == "You run long distances."
    assert not [k for k in samples(text) if k[0] == "adselect_copy_rejections_total"]


def test_metrics_cover_stages_degradation_rules_caps_cache_breaker_and_limiter(demo_settings, demo_services):
    from selection.caps import CapConfig, SQLiteCapStore

    llm = FakeQueueLLM().enqueue(
        "not json at all",  # -> llm_invalid_output
        answer(["run-002"], justification="Because ZX91.", headline="", description=""),  # justification refused
    )
    caps = SQLiteCapStore(":memory:", config=CapConfig(max_per_ad=1, max_per_advertiser=None, window_s=3600))
    svc = services_with(demo_services, reranker=reranker_for(llm, demo_settings), llm_concurrency=1, caps=caps)
    user = f"u-{uuid.uuid4().hex}"
    with TestClient(create_app(demo_settings, services=svc)) as client:
        select(client, user_id=user, events=["searched: trail running shoes"])  # fast path
        select(client, user_id=user, events=["searched: trail running shoes"])  # same user: caps hit; same event: cache hit
        d = select(client, use_llm=True, deadline_ms=5000, candidates=CANDIDATES)
        assert d.degraded_reason == "llm_invalid_output"
        d = select(client, use_llm=True, deadline_ms=5000, candidates=CANDIDATES, rewrite=False, k=5)
        assert d.llm_used and all(a.justification is None for a in d.ads)
        select(client, context={"blocked_advertisers": ["Stridewell"], "blocked_categories": ["trail"]})
        svc.selector.limiter.try_acquire()  # the only LLM slot is taken: the next request is sent to the fast path
        d = select(client, use_llm=True)
        svc.selector.limiter.release()
        assert d.degraded_reason == "llm_busy"
        text = client.get("/metrics").text

    assert value(text, "adselect_http_requests_total", route="/v1/select", method="POST", status="200") == 6
    assert value(text, "adselect_decisions_total") == 6
    for stage in ("profile", "candidates", "fusion", "finalize", "total", "llm"):
        assert value(text, "adselect_stage_seconds_count", stage=stage) >= 1, stage
    assert value(text, "adselect_degraded_total", reason="llm_invalid_output") == 1
    assert value(text, "adselect_degraded_total", reason="llm_busy") == 1
    assert value(text, "adselect_llm_errors_total", reason="llm_invalid_output") == 1
    assert value(text, "adselect_llm_used_total") == 1
    assert value(text, "adselect_copy_rejections_total", reason="justification_foreign_code") == 1
    assert value(text, "adselect_cap_rejections_total") >= 1
    assert value(text, "adselect_ineligible_total", rule="blocked_advertiser") >= 1
    assert value(text, "adselect_event_cache_hits_total") >= 1
    assert value(text, "adselect_llm_breaker_state") == 0
    assert value(text, "adselect_llm_limiter_rejected_total") == 1
    assert value(text, "adselect_http_request_seconds_count", route="/v1/select") == 6


def test_each_app_has_its_own_registry(demo_settings, demo_services):
    apps = [create_app(demo_settings, services=demo_services) for _ in range(2)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        select(a)
        select(a)
        select(b)
        assert value(a.get("/metrics").text, "adselect_decisions_total") == 2
        assert value(b.get("/metrics").text, "adselect_decisions_total") == 1
