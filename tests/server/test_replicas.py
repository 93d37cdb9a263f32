"""Stateless replicas on loopback: one `chroma run` server, one redis-server and two `adselect serve` processes
sharing the catalog (Chroma), the serving artifact (`adselect build`), frequency caps and the rate limit (Redis)
and the feedback store. Proves: the same request gets the same decision from either replica; parallel requests
for one user split across both never exceed the caps; the rate limit is global; with one replica SIGKILLed the
other keeps answering and nothing acknowledged (cap reservations, events) is lost.

Every process runs in its own process group, killed in teardown. Bounded: start-up waits are capped and every
phase sends a fixed number of requests."""
from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from agent.local_server import free_port
from kernel.settings import Settings
from retrieval.records import read_ads
from server.limits import SharedRateLimit, TokenBuckets, rate_limiter
from tests.server.processes import chroma_server, redis_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"
START_TIMEOUT_S = 180
KEYS = [f"replica-test-key-{i:02d}" for i in range(40)]  # each test request uses the next key: no key nears the rate limit
RATE_KEY = "replica-test-key-rate"
RATE_PER_S, BURST = 0.1, 10  # 10 requests in any 100 s window, per key, across every replica
CAP_PER_AD, CAP_PER_ADVERTISER = 3, 5
PARALLEL = 50


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return env | extra


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class Replica:
    def __init__(self, name: str, workdir: Path, env: dict[str, str]):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "adselect.cli", "serve", "--no-llm", "--workers", "1", "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(workdir / name)]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"replica {self.name} did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, embedder):
    from retrieval.ingest import ingest_catalog, learn_behaviour
    from selection.services import behaviour_dir, make_store

    work = tmp_path_factory.mktemp("replicas")
    (work / "chroma").mkdir()
    (work / "redis").mkdir()
    with chroma_server(work / "chroma") as (chroma_url, _), redis_server(work / "redis") as (redis_url, _):
        # the build machine: ingest into the shared Chroma, learn the behaviour tables, `adselect build`
        build_settings = Settings(_env_file=None, data_dir=work / "build", chroma_url=chroma_url, sequence_enabled=False)
        store = make_store(build_settings)
        ingest_catalog(ads_path=DEMO / "ads.jsonl", store=store, embedder=embedder)
        learn_behaviour(
            history_paths=[DEMO / "impressions.jsonl"], catalog_ids=store.load_index().ids, out_dir=behaviour_dir(build_settings),
            window=build_settings.covisit_window, decay=build_settings.recency_decay, cf_dims=build_settings.cf_dims,
        )  # fmt: skip
        built = subprocess.run(
            [sys.executable, "-m", "adselect.cli", "build", "--data-dir", str(build_settings.data_dir), "--out", str(work / "artifacts")],
            cwd=ROOT, env=_env(ADSELECT_CHROMA_URL=chroma_url, ADSELECT_SEQUENCE_ENABLED="false"),
            capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr[-3000:]
        version = built.stdout.split()[1]
        env = _env(
            ADSELECT_CHROMA_URL=chroma_url,
            ADSELECT_REDIS_URL=redis_url,
            ADSELECT_ARTIFACT_DIR=str(work / "artifacts"),
            ADSELECT_SEQUENCE_ENABLED="false",
            ADSELECT_USER_KEY_SECRET="replica-test-secret-0123456789",  # one secret: both replicas key a user the same
            ADSELECT_FEEDBACK_PATH=str(work / "feedback.sqlite"),  # one feedback store (same host: SQLite WAL)
            ADSELECT_IMPRESSION_LOG_SYNC="true",  # a decision is acknowledged only once its served rows are written
            ADSELECT_API_KEYS=",".join([*KEYS, RATE_KEY]),
            ADSELECT_RATE_LIMIT_PER_S=str(RATE_PER_S),
            ADSELECT_RATE_LIMIT_BURST=str(BURST),
            ADSELECT_CAP_MAX_PER_AD=str(CAP_PER_AD),
            ADSELECT_CAP_MAX_PER_ADVERTISER=str(CAP_PER_ADVERTISER),
            ADSELECT_MAX_INFLIGHT="0",
            ADSELECT_LOG_QUEUE_SIZE="0",
        )
        replicas = [Replica(name, work, env) for name in ("a", "b")]
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            for r in replicas:
                r.wait_ready(deadline)
            yield {"replicas": replicas, "version": version, "redis_url": redis_url}
        finally:
            for r in replicas:
                _stop_group(r.proc)


_keys = itertools.cycle(KEYS)


def post(url: str, path: str, body: dict, *, key: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as client:  # a new connection each
        return client.post(path, json=body, headers={"X-API-Key": key or next(_keys)})


def select(url: str, body: dict) -> dict:
    res = post(url, "/v1/select", body)
    assert res.status_code == 200, res.text
    return res.json()


def test_the_same_request_gets_the_same_decision_from_either_replica(cluster):
    a, b = cluster["replicas"]
    for history in (["run-001", "run-004"], ["run-010"], []):
        body = {"user_id": f"same-{uuid.uuid4().hex}", "history": history, "events": ["searched: trail shoes"], "k": 3, "use_llm": False}
        ra, rb = select(a.url, body), select(b.url, body)
        assert [x["ad_id"] for x in ra["ads"]] == [x["ad_id"] for x in rb["ads"]] and ra["ads"]
        assert [x["score"] for x in ra["ads"]] == pytest.approx([x["score"] for x in rb["ads"]], rel=1e-6)
        assert ra["versions"] == rb["versions"] and ra["versions"]["artifact"] == cluster["version"]


def test_parallel_requests_for_one_user_split_across_replicas_never_exceed_the_caps(cluster):
    a, b = cluster["replicas"]
    ads = {ad.ad_id: ad for ad in read_ads(DEMO / "ads.jsonl")}
    by_adv = collections.defaultdict(list)
    for ad in ads.values():
        by_adv[ad.advertiser].append(ad.ad_id)
    two = [adv for adv, ids in by_adv.items() if len(ids) >= 3][:2]
    candidates = [i for adv in two for i in by_adv[adv][:3]]  # 6 ads of 2 advertisers: caps bind well before 50
    body = {"user_id": f"capped-{uuid.uuid4().hex}", "history": [], "candidates": candidates, "k": 1, "use_llm": False}

    def one(i: int) -> list[str]:
        return [x["ad_id"] for x in select((a, b)[i % 2].url, body)["ads"]]  # half to each replica

    with ThreadPoolExecutor(max_workers=10) as pool:
        served = [ad for got in pool.map(one, range(PARALLEL)) for ad in got]
    per_ad = collections.Counter(served)
    per_adv = collections.Counter(ads[i].advertiser for i in served)
    assert served and max(per_ad.values()) <= CAP_PER_AD and max(per_adv.values()) <= CAP_PER_ADVERTISER
    assert len(served) == len(two) * CAP_PER_ADVERTISER  # the caps bound: every advertiser served exactly its cap


def test_the_rate_limit_is_global_not_per_replica(cluster):
    a, b = cluster["replicas"]
    body = {"user_id": "rate", "history": [], "k": 1, "use_llm": False}
    codes = [post((a, b)[i % 2].url, "/v1/select", body, key=RATE_KEY).status_code for i in range(2 * BURST)]
    assert collections.Counter(codes) == {200: BURST, 429: BURST}  # per replica it would be 2 x BURST answered


def test_shared_rate_limit_lets_requests_through_when_redis_is_down(tmp_path):
    with redis_server(tmp_path) as (url, proc):
        limit = SharedRateLimit(redis_url=url, rate=1.0, burst=2, timeout_s=0.2)
        other = rate_limiter(Settings(_env_file=None, redis_url=url, rate_limit_per_s=1.0, rate_limit_burst=2))
        assert isinstance(other, SharedRateLimit)
        assert [limit.take("k"), other.take("k")] == [0.0, 0.0] and other.take("k") > 0 and limit.take("k") > 0
        proc.kill()
        proc.wait(timeout=10)
        assert limit.take("k") == 0.0 and limit.failures == 1  # fails open, counted
        assert limit.take("k") == 0.0 and limit.failures == 1  # and skips Redis for a second
    assert isinstance(rate_limiter(Settings(_env_file=None, rate_limit_per_s=1.0)), TokenBuckets)  # no Redis: in memory
    assert rate_limiter(Settings(_env_file=None)) is None


def test_with_one_replica_killed_the_other_answers_and_nothing_acknowledged_is_lost(cluster):
    a, b = cluster["replicas"]
    ads = {ad.ad_id: ad for ad in read_ads(DEMO / "ads.jsonl")}
    candidates = list(ads)[40:44]
    body = {"user_id": f"killed-{uuid.uuid4().hex}", "history": [], "candidates": candidates, "k": 1, "use_llm": False}
    served: list[str] = []
    acked: list[dict] = []
    for _ in range(4):  # A serves and records events, then dies
        r = select(a.url, body)
        assert r["ads"]
        ad_id = r["ads"][0]["ad_id"]
        served.append(ad_id)
        event = {"event_id": uuid.uuid4().hex, "request_id": r["request_id"], "ad_id": ad_id, "type": "rendered"}
        assert post(a.url, "/v1/events", event).json()["status"] == "recorded"
        acked.append(event)
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait(timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{a.url}/healthz", timeout=2)
    for event in acked:  # every event A acknowledged is in the shared store: B sees it as already recorded
        res = post(b.url, "/v1/events", event)
        assert res.status_code == 200 and res.json()["status"] == "duplicate", res.text
    late = dict(acked[0], event_id=uuid.uuid4().hex, type="click")  # and A's served decisions take new events
    assert post(b.url, "/v1/events", late).json()["status"] == "recorded"
    for _ in range(len(candidates) * CAP_PER_AD + 2):  # B keeps answering; A's cap reservations still count
        served += [x["ad_id"] for x in select(b.url, body)["ads"]]
    per_ad = collections.Counter(served)
    per_adv = collections.Counter(ads[i].advertiser for i in served)
    assert max(per_ad.values()) <= CAP_PER_AD and max(per_adv.values()) <= CAP_PER_ADVERTISER
    of_adv = collections.Counter(ads[i].advertiser for i in candidates)
    # exactly what the caps allow in all: had A's reservations been lost, B would have served more
    assert len(served) == sum(min(CAP_PER_ADVERTISER, CAP_PER_AD * n) for n in of_adv.values())
