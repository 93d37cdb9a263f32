"""ADSELECT_FAST_PATH_ON_LOOP: the fast path's core runs on the event loop itself (no hop to a worker thread),
and answers what the worker thread answers. Real demo services through TestClient."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from fastapi.testclient import TestClient

from server.app import create_app


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_fast_path_runs_on_the_event_loop_only_when_configured(demo_settings, demo_services):
    body = {"user_id": f"u-{uuid.uuid4().hex}", "history": ["run-001", "run-004", "run-009"], "k": 3, "use_llm": False}
    answers = {}
    for on_loop in (False, True):
        seen: list[bool] = []  # per audit line (written inside the fast path): was a loop running in its thread
        settings = demo_settings.model_copy(update={"fast_path_on_loop": on_loop})
        selector = replace(demo_services.selector, audit=lambda record: seen.append(_on_a_loop()), caps=None)
        services = replace(demo_services, settings=settings, selector=selector)
        with TestClient(create_app(settings, services=services)) as client:
            r = client.post("/v1/select", json=body)
        assert r.status_code == 200
        assert seen == [on_loop]
        answers[on_loop] = [(a["ad_id"], a["score"]) for a in r.json()["ads"]]
    assert answers[True] == answers[False] and len(answers[True]) == 3
