"""/healthz is liveness, /readyz readiness: Chroma, the cap store and the LLM, each checked against a real
server that is then killed (redis-server, `chroma run`, a port where nothing listens)."""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.local_server import free_port
from selection.caps import open_cap_store
from selection.services import build_services, make_store
from server.app import create_app
from server.protocol import ReadyResponse
from tests.security.conftest import API_KEY, services_with, settings_with
from tests.server.processes import chroma_server, redis_server


def ready(client: TestClient, **kw) -> tuple[int, ReadyResponse]:
    res = client.get("/readyz", **kw)
    return res.status_code, ReadyResponse.model_validate(res.json())


def statuses(r: ReadyResponse) -> dict[str, str]:
    return {name: c.status.value for name, c in r.checks.items()}


def select_body() -> dict:
    return {"user_id": f"u-{uuid.uuid4().hex}", "history": ["run-001"], "k": 2, "use_llm": False}


def test_readyz_checks_each_dependency(demo_settings, demo_services):
    with TestClient(create_app(demo_settings, services=demo_services)) as c:
        code, r = ready(c)
    assert code == 200 and r.status == "ready"
    assert statuses(r) == {"chroma": "up", "caps": "up", "llm": "off"}
    assert r.checks["chroma"].ms >= 0 and r.checks["caps"].ms >= 0


def test_llm_down_is_degraded_not_unready(demo_settings, demo_services, embedder):
    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = demo_settings.model_copy(update={"llm_url": url})
    services = build_services(settings, llm_url=url, embedder=embedder, store=demo_services.store)
    with TestClient(create_app(settings, services=services, llm_url=url)) as c:
        res = c.get("/readyz")
        health = c.get("/healthz")
    r = ReadyResponse.model_validate(res.json())
    assert res.status_code == 200 and r.status == "degraded"
    assert statuses(r) == {"chroma": "up", "caps": "up", "llm": "down"}
    assert r.checks["llm"].error == "ConnectError" and r.checks["llm"].breaker == "closed"
    assert url not in res.text and str(url.split(":")[-1]) not in health.text


@pytest.mark.llm_server
def test_llm_up_against_the_real_server(local_llm_url: str, demo_settings, demo_services, embedder):
    settings = demo_settings.model_copy(update={"llm_url": local_llm_url})
    services = build_services(settings, llm_url=local_llm_url, embedder=embedder, store=demo_services.store)
    with TestClient(create_app(settings, services=services, llm_url=local_llm_url)) as c:
        code, r = ready(c)
    assert code == 200 and r.status == "ready" and statuses(r)["llm"] == "up"


def test_cap_store_down_is_503_and_leaks_nothing(tmp_path: Path, demo_settings, demo_services):
    with redis_server(tmp_path) as (url, proc):
        caps = open_cap_store(demo_settings.model_copy(update={"redis_url": url}))
        port = url.rsplit(":", 1)[1].split("/")[0]
        with TestClient(create_app(demo_settings, services=services_with(demo_services, caps=caps))) as c:
            assert ready(c)[0] == 200
            proc.kill()
            proc.wait(timeout=10)
            code, r = ready(c)
            served = c.post("/v1/select", json=select_body())
    assert code == 503 and r.status == "unready"
    assert statuses(r) == {"chroma": "up", "caps": "down", "llm": "off"}
    assert r.checks["caps"].error == "CapStoreError"
    # whatever the cap store's failure policy, no answer names the dependency's address
    assert port not in served.text and "redis" not in served.text.lower(), served.text


def test_chroma_down_is_503(tmp_path: Path, demo_settings, demo_services):
    with chroma_server(tmp_path) as (url, proc):
        store = make_store(demo_settings.model_copy(update={"chroma_url": url}))
        services = dataclasses.replace(demo_services, store=store)
        with TestClient(create_app(demo_settings, services=services)) as c:
            assert ready(c)[0] == 200
            proc.kill()
            proc.wait(timeout=10)
            code, r = ready(c)
    assert code == 503 and r.status == "unready"
    assert statuses(r) == {"chroma": "down", "caps": "up", "llm": "off"}
    assert r.checks["chroma"].error and url not in r.model_dump_json()


def test_readyz_is_behind_the_keys_healthz_is_not(demo_settings, demo_services):
    app = create_app(settings_with(demo_settings, api_keys=[API_KEY]), services=demo_services)
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 401
        assert ready(c, headers={"X-API-Key": API_KEY})[0] == 200
        assert c.get("/healthz").status_code == 200
        spec = c.get("/openapi.json", headers={"X-API-Key": API_KEY}).json()
    assert spec["paths"]["/readyz"]["get"]["security"] and "security" not in spec["paths"]["/healthz"]["get"]
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
