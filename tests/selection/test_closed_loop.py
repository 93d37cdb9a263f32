"""The closed loop wired into the pipeline, on the real demo catalog: arms (own weights, exploration, LLM
switch), exact propensities with caps and eligibility applied to explored ads, consent, and one impression-log
record + served rows per decision (the real JSONL writer and SQLite feedback store)."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

from kernel.types import RequestContext, SelectRequest
from retrieval.features import FEATURES
from selection.caps import CapConfig, SQLiteCapStore
from selection.experiments import Arm, Experiment, Variant
from selection.exploration import ExplorationConfig
from selection.feedback import FeedbackStore
from selection.fusion import FusionModel
from selection.impression_log import JsonlImpressionLog, iter_log_records
from selection.served_queue import ServedQueue
from selection.services import arm_policies, weights_version

HISTORY = ["run-001", "run-004", "run-009"]
SOFTMAX = ExplorationConfig(method="softmax", temperature=0.5, top_m=4)


def one_feature_weights(path: Path, feature: str) -> Path:
    m = FusionModel.hand_tuned()
    m.coef = np.array([1.0 if f == feature else 0.0 for f in FEATURES])
    m.save(path)
    return path


def loop_selector(services, tmp_path: Path, experiment: Experiment, **changes):
    """The session's selector with its own log, feedback store and arms (caps off unless given)."""
    log = JsonlImpressionLog(tmp_path / "impressions", fsync="never")
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    served = ServedQueue(store)
    sel = replace(services.selector, experiment=experiment, impressions=log, served_sink=served, **{"caps": None, **changes})
    sel.arm_policies = arm_policies(sel, experiment, settings=services.settings, llm_url=None, reranker_injected=True)
    return sel, log, store, served


def select(sel, **fields):
    req = SelectRequest(**{"user_id": f"u-{uuid.uuid4().hex}", "history": HISTORY, "k": 1, "use_llm": False, **fields})
    return asyncio.run(sel.aselect(req))


def test_each_decision_is_logged_with_its_arm_propensity_and_versions(demo_services, tmp_path):
    exp = Experiment(name="t", arms=[Arm(name="explore", share=1.0, variant=Variant(exploration=SOFTMAX))])
    sel, log, store, served = loop_selector(demo_services, tmp_path, exp)
    decisions = [select(sel, k=2) for _ in range(5)]
    log.flush()
    records = {r["request_id"]: r for r in iter_log_records(tmp_path / "impressions")}
    assert len(records) == 5
    for d in decisions:
        r = records[d.request_id]
        assert d.arm == r["arm"] == "explore"
        assert r["served"] == [a.ad.ad_id for a in d.ads]
        assert [s["propensity"] for s in r["served_ads"]] == [a.propensity for a in d.ads]
        assert all(0 < a.propensity < 1 for a in d.ads)  # randomised among 4
        assert r["weights_version"] == d.versions["weights"] == weights_version(demo_services.fusion)
        assert r["history"] == HISTORY and r["personalized"] is True
        assert r["exploration"]["method"] == "softmax"
        assert [s["ad_id"] for s in r["scored"]][: len(d.ranking)] == r["candidates"]
    d = decisions[0]
    # posted before the served rows were necessarily written: the queue is flushed and the event accepted
    assert served.record_event(event_id="e2", request_id=d.request_id, ad_id=d.ads[1].ad.ad_id, type="click", value=None) == "recorded"
    joined = list(store.join([records[d.request_id]]))[0]
    assert set(joined["clicked"]) >= {d.ads[1].ad.ad_id}


def test_propensities_are_the_frequencies_of_the_draws(demo_services, tmp_path):
    """One user, many requests (request ids seed the draw): the first ad's frequency follows its logged propensity."""
    flat = ExplorationConfig(method="softmax", temperature=5.0, top_m=4)
    exp = Experiment(name="t", arms=[Arm(name="explore", share=1.0, variant=Variant(exploration=flat))])
    sel, *_ = loop_selector(demo_services, tmp_path, exp)
    user = f"u-{uuid.uuid4().hex}"
    n = 300
    seen: Counter = Counter()
    prop: dict[str, float] = {}
    for i in range(n):
        d = select(sel, user_id=user, request_id=f"r{i}")
        seen[d.ads[0].ad.ad_id] += 1
        prop[d.ads[0].ad.ad_id] = d.ads[0].propensity
    assert len(seen) == 4  # the pool of 4, each drawn
    assert abs(sum(prop.values()) - 1.0) < 1e-6  # and their probabilities sum to 1
    for ad, p in prop.items():
        assert abs(seen[ad] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 0.01


def test_caps_apply_to_explored_ads_and_only_served_ads_are_reserved(demo_services, tmp_path):
    caps = SQLiteCapStore(tmp_path / "caps.sqlite", config=CapConfig(max_per_ad=1, max_per_advertiser=None))
    exp = Experiment(name="t", arms=[Arm(name="explore", share=1.0, variant=Variant(exploration=SOFTMAX))])
    sel, *_ = loop_selector(demo_services, tmp_path, exp, caps=caps)
    user = f"u-{uuid.uuid4().hex}"
    ukey = sel.user_key(user)
    served = [select(sel, user_id=user).ads[0].ad.ad_id for _ in range(6)]
    assert len(set(served)) == 6  # a capped ad is never drawn again
    assert sum(caps.count(ukey, ad_id=a) for a in set(served)) == 6
    d = select(sel, user_id=user)
    unserved = [a for a in d.ranking[:10] if a not in served and a != d.ads[0].ad.ad_id]
    assert all(caps.count(ukey, ad_id=a) == 0 for a in unserved)


def test_each_arm_serves_with_its_own_weights_and_says_so(demo_services, tmp_path):
    pop = one_feature_weights(tmp_path / "pop.json", "popularity")
    exp = Experiment(name="w", arms=[Arm(name="pop", share=1.0, variant=Variant(weights=pop, llm=False))])
    sel, log, *_ = loop_selector(demo_services, tmp_path, exp, rank_by="relevance")
    d = select(sel, k=5, use_llm=True)
    assert d.arm == "pop" and d.llm_used is False and d.degraded is False  # the arm's LLM switch, not a degradation
    assert d.versions["weights"] == weights_version(FusionModel.load(pop)) != weights_version(demo_services.fusion)
    pops = [a.priors["popularity"] for a in d.ads]
    assert pops == sorted(pops, reverse=True)
    log.flush()
    (rec,) = list(iter_log_records(tmp_path / "impressions"))
    assert rec["weights_version"] == d.versions["weights"]


def test_arms_follow_the_keyed_user_hash(demo_services, tmp_path):
    exp = Experiment(name="split", arms=[Arm(name="a", share=0.5), Arm(name="b", share=0.5)])
    sel, *_ = loop_selector(demo_services, tmp_path, exp)
    users = [f"u{i}" for i in range(20)]
    arms = [select(sel, user_id=u).arm for u in users]
    assert arms == [exp.assign(sel.user_key(u)).name for u in users]
    assert set(arms) == {"a", "b"}


def test_without_consent_no_history_no_events_and_none_logged(demo_services, tmp_path):
    sel, log, *_ = loop_selector(demo_services, tmp_path, Experiment.single())
    now = RequestContext(now=datetime(2024, 5, 1), consent=False)
    d = select(sel, k=3, context=now, events=["searched: trail shoes"])
    anon = select(sel, k=3, history=[], context=RequestContext(now=now.now))
    assert d.personalized is False and anon.personalized is True
    assert d.ranking == anon.ranking  # contextual + popularity signals only
    log.flush()
    recs = {r["request_id"]: r for r in iter_log_records(tmp_path / "impressions")}
    assert recs[d.request_id]["history"] == [] and recs[d.request_id]["events"] == []
    assert recs[d.request_id]["personalized"] is False
    assert "trail" not in json.dumps(recs[d.request_id])
