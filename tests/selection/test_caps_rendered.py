"""cap_count=rendered: a reservation counts while pending only within the grace time; a `rendered` event
(through the feedback store's hook) makes it a counted impression. Real SQLite stores."""
from __future__ import annotations

import pytest

from kernel.errors import ConfigError
from kernel.settings import Settings
from selection.caps import CapConfig, SQLiteCapStore, open_cap_store
from selection.feedback import FeedbackStore, ServedAdRow

T0 = 1_000_000.0


def store(tmp_path, *, rendered: bool = True) -> SQLiteCapStore:
    cfg = CapConfig(max_per_ad=1, max_per_advertiser=None, window_s=3600, count_rendered=rendered, render_grace_s=10)
    return SQLiteCapStore(tmp_path / "caps.sqlite", config=cfg)


def test_an_unrendered_reservation_gives_its_slot_back_after_the_grace_time(tmp_path):
    caps = store(tmp_path)
    assert caps.reserve("u", "ad", "adv", now=T0) is not None
    assert caps.reserve("u", "ad", "adv", now=T0 + 5) is None  # pending, within grace: it counts
    assert caps.count("u", ad_id="ad", now=T0 + 5) == 1
    assert caps.count("u", ad_id="ad", now=T0 + 11) == 0  # never rendered: lapsed
    assert caps.reserve("u", "ad", "adv", now=T0 + 11) is not None


def test_a_rendered_event_turns_the_reservation_into_a_counted_impression(tmp_path):
    caps = store(tmp_path)
    feedback = FeedbackStore(tmp_path / "feedback.sqlite", on_rendered=caps)
    assert caps.reserve("u", "ad", "adv", now=T0) is not None
    feedback.record_served(request_id="r1", user_key="u", ads=[ServedAdRow("ad", "adv")], now=T0)
    assert feedback.record(event_id="e1", request_id="r1", ad_id="ad", type="rendered", now=T0 + 1) == "recorded"
    assert caps.count("u", ad_id="ad", now=T0 + 100) == 1  # counted for the whole window now
    assert caps.reserve("u", "ad", "adv", now=T0 + 100) is None


def test_decision_counting_is_unchanged_and_redis_refuses_rendered_mode(tmp_path):
    caps = store(tmp_path / "d", rendered=False)
    assert caps.reserve("u", "ad", "adv", now=T0) is not None
    assert caps.count("u", ad_id="ad", now=T0 + 100) == 1
    s = Settings(_env_file=None, data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", cap_count="rendered")
    with pytest.raises(ConfigError):
        open_cap_store(s)


def test_services_wire_the_render_hook_when_caps_count_rendered(demo_settings, demo_services, embedder, tmp_path):
    from selection.services import build_services

    s = demo_settings.model_copy(update={"cap_count": "rendered", "feedback_path": tmp_path / "fb.sqlite", "impression_log_enabled": False})
    caps = store(tmp_path / "c")
    svc = build_services(s, embedder=embedder, store=demo_services.store, caps=caps)
    try:
        assert svc.feedback.on_rendered is caps
    finally:
        svc.close()
