"""`adselect serve --workers 2` on loopback over the demo catalog: frequency caps hold across worker
processes under parallel requests for one user, /metrics counts the requests of both workers, and one
authenticated POST /admin/reload switches every worker (a bad file switches none)."""
from __future__ import annotations

import collections
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agent.local_server import free_port
from kernel.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MAX_REQUESTS = 240  # bound on the parallel phase (both workers must have answered some by then)


def _per_worker_select_counts(metrics_dir: Path) -> dict[str, float]:
    """POST /v1/select 200 count per worker pid, read from each worker's own multiprocess file."""
    from prometheus_client import CollectorRegistry, multiprocess

    out: dict[str, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = f.stem.split("_")[-1]
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(f, one)
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg, path=one)
            total = 0.0
            for metric in reg.collect():
                for s in metric.samples:
                    if s.name == "adselect_http_requests_total" and s.labels.get("route") == "/v1/select":
                        total += s.value
        out[pid] = total
    return out


@contextmanager
def serve_two_workers(demo_settings: Settings, tmp_path: Path, **extra_env: str):
    """(base URL, metrics dir, data dir) of a real `adselect serve --workers 2` over a copy of the demo data dir."""
    data_dir = tmp_path / "var"
    shutil.copytree(demo_settings.data_dir, data_dir)  # caps.sqlite and the metrics dir of this server only
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["ADSELECT_COLLECTION"] = demo_settings.collection
    env.update(extra_env)
    log = (tmp_path / "server.log").open("wb")
    cmd = [sys.executable, "-m", "adselect.cli", "serve", "--no-llm", "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    # its own process group: teardown stops the workers too, never leaving them behind as orphans
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", data_dir / "metrics" / f"serve-{proc.pid}", data_dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there (workers included)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def two_workers(demo_settings: Settings, tmp_path: Path):
    with serve_two_workers(demo_settings, tmp_path) as (base, metrics_dir, _):
        yield base, metrics_dir


def test_caps_hold_across_workers_and_metrics_count_both(two_workers, demo_services):
    base, metrics_dir = two_workers
    settings = Settings(_env_file=None)
    history = demo_services.index.ids[:3]

    def one(_: int) -> list[tuple[str, str]]:
        with httpx.Client(base_url=base, timeout=30) as client:  # a new connection each: both workers accept
            res = client.post("/v1/select", json={"user_id": "one-user", "history": history, "k": 5, "use_llm": False})
        assert res.status_code == 200, res.text
        return [(a["ad_id"], a["advertiser"]) for a in res.json()["ads"]]

    served: list[tuple[str, str]] = []
    sent = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        while sent < MAX_REQUESTS:
            for ads in pool.map(one, range(40)):
                served += ads
            sent += 40
            counts = _per_worker_select_counts(metrics_dir)
            if len(counts) >= 2 and all(v > 0 for v in counts.values()):
                break
    per_ad = collections.Counter(ad for ad, _ in served)
    per_adv = collections.Counter(adv for _, adv in served if adv)
    assert served and max(per_ad.values()) <= settings.cap_max_per_ad
    assert max(per_adv.values()) <= settings.cap_max_per_advertiser
    assert len(per_ad) < sent * 5  # the caps did bind: far fewer distinct ads than slots asked for

    counts = _per_worker_select_counts(metrics_dir)
    assert len(counts) == 2 and all(v > 0 for v in counts.values()), counts
    assert sum(counts.values()) == sent
    for _ in range(4):  # whichever worker answers the scrape reports the requests of both
        text = httpx.get(f"{base}/metrics", timeout=10).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("adselect_http_requests_total{") and 'route="/v1/select"' in line
        )
        assert total == sent


KEY = "k-workers-0123456789"
AUTH = {"X-API-Key": KEY}


def _weights(path: Path, feature: str) -> None:
    import numpy as np

    from retrieval.features import FEATURES
    from selection.fusion import FusionModel

    m = FusionModel.hand_tuned()
    m.coef = np.array([1.0 if f == feature else 0.0 for f in FEATURES])
    m.save(path)


def _weights_versions_of_both_workers(base: str, metrics_dir: Path, history: list[str]) -> list[str]:
    """The weights version of every response to parallel requests (a new connection each), sent until both
    workers have answered some of them (bounded by MAX_REQUESTS)."""
    before = _per_worker_select_counts(metrics_dir)

    def one(_: int) -> str:
        with httpx.Client(base_url=base, timeout=30, headers=AUTH) as client:
            res = client.post("/v1/select", json={"user_id": f"u-{_}-{time.monotonic_ns()}", "history": history, "k": 2, "use_llm": False})
        assert res.status_code == 200, res.text
        return res.json()["versions"]["weights"]

    seen: list[str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        while len(seen) < MAX_REQUESTS:
            seen += list(pool.map(one, range(40)))
            after = _per_worker_select_counts(metrics_dir)
            if len(after) >= 2 and all(after[p] > before.get(p, 0) for p in after):
                return seen
    pytest.fail(f"both workers did not answer within {MAX_REQUESTS} requests: {_per_worker_select_counts(metrics_dir)}")


def test_one_admin_reload_switches_every_worker_and_a_bad_file_none(demo_settings, demo_services, tmp_path):
    with serve_two_workers(demo_settings, tmp_path, ADSELECT_API_KEYS=KEY) as (base, metrics_dir, data_dir):
        history = demo_services.index.ids[:3]
        old = set(_weights_versions_of_both_workers(base, metrics_dir, history))
        assert len(old) == 1

        _weights(data_dir / "fusion.json", "popularity")  # data_dir/fusion.json: the weights the workers read
        assert httpx.post(f"{base}/admin/reload", timeout=60).status_code == 401  # authenticated like every admin call
        res = httpx.post(f"{base}/admin/reload", headers=AUTH, timeout=60)
        assert res.status_code == 200, res.text
        body = res.json()
        new = body["versions"]["weights"]
        assert {new} != old
        assert set(_weights_versions_of_both_workers(base, metrics_dir, history)) == {new}  # the other worker too
        assert len(body["workers"]) == 2 and body["pending"] == []  # the versions of every worker, once all have switched
        assert all(w["generation"] == body["generation"] and w["versions"]["weights"] == new for w in body["workers"].values())

        (data_dir / "fusion.json").write_text('{"features": ["not", "these"]')  # truncated JSON
        bad = httpx.post(f"{base}/admin/reload", headers=AUTH, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "reload_refused"
        assert set(_weights_versions_of_both_workers(base, metrics_dir, history)) == {new}  # every worker keeps the previous version
