"""API protection through the HTTP surface: API keys (401), body limit (413), body read timeout (408), rate
limit (429), load shedding (503 at once), and /metrics, /docs, /openapi.json, /readyz behind the same keys."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.protocol import ErrorResponse
from tests.security.conftest import API_KEY, OTHER_KEY, reranker_for, services_with, settings_with
from tests.security.fakes import FakeFunctionLLM
from tests.security.live import LiveServer

HISTORY = ["run-001", "run-004", "run-009"]


def select_body(**fields) -> dict:
    return {"user_id": f"u-{uuid.uuid4().hex}", "history": HISTORY, "k": 2, "use_llm": False, **fields}


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert ErrorResponse.model_validate(r.json()).error.code == code


# ---- API keys ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_client(demo_settings, demo_services):
    app = create_app(settings_with(demo_settings, api_keys=[API_KEY, OTHER_KEY]), services=demo_services)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/select"), ("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/docs"), ("GET", "/redoc"),
        ("GET", "/openapi.json"), ("GET", "/nope"),
    ],  # fmt: skip
)
def test_every_route_but_healthz_needs_a_key(keyed_client, method, path):
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer "}):
        r = keyed_client.request(method, path, headers=headers, json=select_body() if method == "POST" else None)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("headers", [{"X-API-Key": API_KEY}, {"Authorization": f"Bearer {OTHER_KEY}"}, {"authorization": f"bearer {API_KEY}"}])
def test_a_valid_key_in_either_header_is_accepted(keyed_client, headers):
    assert keyed_client.post("/v1/select", json=select_body(), headers=headers).status_code == 200
    for path in ("/metrics", "/readyz", "/docs", "/openapi.json"):
        assert keyed_client.get(path, headers=headers).status_code == 200


def test_healthz_stays_public(keyed_client):
    assert keyed_client.get("/healthz").status_code == 200


def test_openapi_documents_the_key_schemes(keyed_client):
    schema = keyed_client.get("/openapi.json", headers={"X-API-Key": API_KEY}).json()
    assert set(schema["components"]["securitySchemes"]) == {"ApiKeyHeader", "BearerKey"}
    assert schema["paths"]["/v1/select"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert {"401", "413", "429", "503"} <= set(schema["paths"]["/v1/select"]["post"]["responses"])


def test_no_keys_configured_means_no_auth(demo_settings, demo_services):
    with TestClient(create_app(demo_settings, services=demo_services)) as client:
        assert client.post("/v1/select", json=select_body()).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_unauthorized_requests_are_counted(demo_settings, demo_services):
    app = create_app(settings_with(demo_settings, api_keys=[API_KEY]), services=demo_services)
    with TestClient(app) as client:
        for _ in range(3):
            client.post("/v1/select", json=select_body())
        text = client.get("/metrics", headers={"X-API-Key": API_KEY}).text
    assert 'adselect_refused_total{reason="unauthorized"} 3.0' in text
    assert 'adselect_http_requests_total{method="POST",route="/v1/select",status="401"} 3.0' in text


# ---- body limit ---------------------------------------------------------------------------------------

LIMIT = 2048


@pytest.fixture(scope="module")
def small_body_server(demo_settings, demo_services):
    app = create_app(settings_with(demo_settings, max_body_bytes=LIMIT), services=demo_services)
    with LiveServer(app) as server:
        yield server


def _padded(size: int) -> bytes:
    """A JSON body of exactly `size` bytes (valid request, padded with spaces)."""
    raw = httpx.Request("POST", "/", json=select_body()).content
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_declared_length_over_the_limit_is_413(small_body_server):
    r = httpx.post(f"{small_body_server.url}/v1/select", content=_padded(LIMIT + 1), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")


def test_streamed_body_over_the_limit_is_413(small_body_server):
    def chunks():  # no Content-Length: chunked transfer, the server must count
        body = _padded(LIMIT * 4)
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    r = httpx.post(f"{small_body_server.url}/v1/select", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert_error(r, 413, "body_too_large")


def test_body_at_the_limit_is_served(small_body_server):
    r = httpx.post(f"{small_body_server.url}/v1/select", content=_padded(LIMIT), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text

    def chunks():
        body = _padded(LIMIT)
        yield body[:1000]
        yield body[1000:]

    assert httpx.post(f"{small_body_server.url}/v1/select", content=chunks(), headers={"content-type": "application/json"}).status_code == 200


def test_a_plain_client_sending_8_mb_reads_the_413(small_body_server):
    """urllib writes its whole body (Content-Length) before it reads: the server drains the refused body, so
    the client reads the 413 instead of 'Connection reset by peer' (closing with unread bytes sends a RST)."""
    req = urllib.request.Request(
        f"{small_body_server.url}/v1/select", data=b" " * (8 * 2**20), headers={"Content-Type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 413
    assert ErrorResponse.model_validate(json.loads(info.value.read())).error.code == "body_too_large"
    assert info.value.headers["Connection"] == "close"


SLOW_CLIENTS = 20
SLOW_TIMEOUT_S = 4.0


def _gauge(app, name: str) -> float:
    return app.state.metrics.registry.get_sample_value(name)


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_bodies_hold_no_slot_and_are_cut_off(demo_settings, demo_services):
    """20 clients send headers and half a body, then stall, with max_inflight=2: normal requests are served
    meanwhile (a slot is taken only once a body is in), and each slow client reads a 408 when its time is up."""
    settings = settings_with(demo_settings, max_inflight=2, body_read_timeout_s=SLOW_TIMEOUT_S)
    app = create_app(settings, services=demo_services)
    head = b"POST /v1/select HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    slow: list[socket.socket] = []
    with LiveServer(app) as server:
        try:
            for _ in range(SLOW_CLIENTS):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=SLOW_TIMEOUT_S + 10)
                sock.sendall(head + b'{"user_id": "slow", ')
                slow.append(sock)
            deadline = time.monotonic() + 10
            while _gauge(app, "adselect_body_reading") < SLOW_CLIENTS:
                assert time.monotonic() < deadline, "the slow clients never reached the body reader"
                time.sleep(0.02)
            with httpx.Client(base_url=server.url, timeout=10) as client:
                codes = [client.post("/v1/select", json=select_body()).status_code for _ in range(5)]
            still_reading = _gauge(app, "adselect_body_reading")
            answers = [_read_to_eof(sock) for sock in slow]
        finally:
            for sock in slow:
                sock.close()
        assert _gauge(app, "adselect_body_reading") == 0 and _gauge(app, "adselect_select_inflight") == 0
        refused = app.state.metrics.registry.get_sample_value("adselect_refused_total", {"reason": "body_timeout"})
    assert codes == [200] * 5
    assert still_reading == SLOW_CLIENTS  # the normal requests were served while every slow body was pending
    for answer in answers:
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:200]
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    assert refused == SLOW_CLIENTS


# ---- rate limit ---------------------------------------------------------------------------------------

def test_rate_limit_per_key_with_retry_after(demo_settings, demo_services):
    settings = settings_with(demo_settings, api_keys=[API_KEY, OTHER_KEY], rate_limit_per_s=0.5, rate_limit_burst=3)
    with TestClient(create_app(settings, services=demo_services)) as client:
        key = {"X-API-Key": API_KEY}
        codes = [client.post("/v1/select", json=select_body(), headers=key).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = client.post("/v1/select", json=select_body(), headers=key)
        assert_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        # another key has its own bucket; /metrics is not rate limited
        assert client.post("/v1/select", json=select_body(), headers={"X-API-Key": OTHER_KEY}).status_code == 200
        for _ in range(5):
            assert client.get("/metrics", headers=key).status_code == 200
        text = client.get("/metrics", headers=key).text
    assert 'adselect_refused_total{reason="rate_limited"} 1.0' in text


def test_rate_limit_per_client_ip_without_auth(demo_settings, demo_services):
    settings = settings_with(demo_settings, rate_limit_per_s=0.5, rate_limit_burst=2)
    with TestClient(create_app(settings, services=demo_services)) as client:
        codes = [client.post("/v1/select", json=select_body()).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


# ---- load shedding ------------------------------------------------------------------------------------

SLOW_S = 5.0  # the held requests take this long: a shed answer that waited for a slot would take as long


def test_excess_select_requests_are_shed_at_once(demo_settings, demo_services, frozen_gc):
    """Two slow requests fill max_inflight=2; every further /v1/select is answered 503 while both are still held
    (at once: it never waits for a slot). The shed latency figure is bench/bench_load.py's."""
    slow = services_with(demo_services, reranker=reranker_for(FakeFunctionLLM(delay_s=SLOW_S), demo_settings), llm_concurrency=8)
    settings = settings_with(demo_settings, max_inflight=2)
    app = create_app(settings, services=slow)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.post, "/v1/select", json=select_body(use_llm=True, deadline_ms=int(SLOW_S * 1000) + 3000)) for _ in range(2)]
            deadline = time.monotonic() + 5
            while app.state.metrics.registry.get_sample_value("adselect_select_inflight") < 2:
                assert time.monotonic() < deadline, "slow requests never started"
                time.sleep(0.01)
            client.get("/healthz")  # warm the keep-alive connection
            took = []
            for _ in range(10):
                t = time.perf_counter()
                r = client.post("/v1/select", json=select_body())
                took.append(time.perf_counter() - t)
                assert_error(r, 503, "overloaded")
                assert r.headers["Retry-After"] == "1"
            assert not any(f.done() for f in held), "a shed answer waited for a held slot"
            assert app.state.metrics.registry.get_sample_value("adselect_select_inflight") == 2
            assert all(f.result().status_code == 200 for f in held)
        assert client.post("/v1/select", json=select_body()).status_code == 200  # slots freed
        text = client.get("/metrics").text
    print(f"shed latency ms: max {max(took) * 1000:.2f}, median {sorted(took)[5] * 1000:.2f}")
    assert max(took) < SLOW_S / 2  # far from the 5 s a queued request would take
    assert 'adselect_refused_total{reason="shed"} 10.0' in text
