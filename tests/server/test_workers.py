"""`adselect serve --workers 2` on loopback over the demo catalog: frequency caps hold across worker
processes under parallel requests for one user, and /metrics counts the requests of both workers."""
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


@pytest.fixture
def two_workers(demo_settings: Settings, tmp_path: Path):
    data_dir = tmp_path / "var"
    shutil.copytree(demo_settings.data_dir, data_dir)  # caps.sqlite and the metrics dir of this server only
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["ADSELECT_COLLECTION"] = demo_settings.collection
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
        yield f"http://127.0.0.1:{port}", data_dir / "metrics" / f"serve-{proc.pid}"
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
