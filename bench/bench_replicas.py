"""Two stateless replicas vs one under wrk: capacity of the fast path at p99 within a deadline, and the ratio.

    python bench/bench_replicas.py [--catalog demo|games] [--seconds 10] [--connections 2,4,8] [--p99-ms 250]

Starts one `chroma run` server and one redis-server on loopback, ingests the catalog into that Chroma,
learns the behaviour tables and runs `adselect build` (the artifact every replica loads), then starts
`adselect serve --no-llm --workers 1` replicas that share Chroma, Redis (frequency caps; the rate limit is
off) and the artifact, each with its own data dir. For each total connection count C it runs wrk
(bench/wrk_select.lua, a different user with a real history per request) against ONE replica with C
connections, then against TWO replicas with C/2 connections each at the same time (two wrk processes: no
load balancer in between; the pair's req/s is the sum, its p99 the worse of the two). Capacity = the most
200s per second of a run whose p99 stayed within --p99-ms with no non-200 answer. wrk, the replicas, Chroma
and Redis all share this machine's cores: on 2 cores two replicas cannot do much better than one (~1x);
the ratio is what scale-out buys when each replica has cores of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_wrk import wrk
from common import CATALOGS, REPO_ROOT, histories, start_server, stop

from agent.local_server import free_port
from kernel.settings import Settings

SECRET = "bench-replicas-secret-0123456789"


def wait(ready, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.1)


def start_chroma(workdir: Path) -> tuple[str, subprocess.Popen]:
    import httpx

    binary = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "run", "--path", str(workdir / "chroma"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=(workdir / "chroma.log").open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait(ready, proc, "chroma run")
    return url, proc


def start_redis(workdir: Path) -> tuple[str, subprocess.Popen]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"

    def ready() -> bool:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=0.5) as c:
                return bool(c.ping())
        except redis.ConnectionError:
            return False

    wait(ready, proc, "redis-server")
    return url, proc


def prepare(catalog: str, work: Path, chroma_url: str) -> Path:
    """Ingest into the Chroma server, learn behaviour, `adselect build`; returns the artifact root."""
    from retrieval.ingest import ingest_catalog, learn_behaviour
    from selection.services import behaviour_dir, make_embedder, make_store

    settings = Settings(_env_file=None, data_dir=work / "build", chroma_url=chroma_url, sequence_enabled=False)
    store = make_store(settings)
    paths = CATALOGS[catalog]
    rep = ingest_catalog(ads_path=paths["ads"], store=store, embedder=make_embedder(settings), show_progress=False)
    learn_behaviour(
        history_paths=[paths["impressions"]], catalog_ids=store.load_index().ids, out_dir=behaviour_dir(settings),
        window=settings.covisit_window, decay=settings.recency_decay, cf_dims=settings.cf_dims,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_")}
    env |= {"ADSELECT_CHROMA_URL": chroma_url, "ADSELECT_SEQUENCE_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "adselect.cli", "build", "--data-dir", str(settings.data_dir), "--out", str(work / "artifacts")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"[{catalog}] ingested {rep.ads} ads into {chroma_url} in {rep.seconds:.1f}s; {out}")
    return work / "artifacts"


def pair_run(urls: list[str], *, connections: int, seconds: int, bodies: list[Path]) -> dict:
    """wrk against each url at once, connections split evenly; the sum of req/s, the worst p99."""
    per = max(1, connections // len(urls))
    with ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(lambda ub: wrk(ub[0], connections=per, seconds=seconds, bodies=ub[1]), zip(urls, bodies)))
    return {
        "c": per * len(urls), "rps": sum(r["rps"] for r in runs), "p99_ms": max(r["p99_ms"] for r in runs),
        "p50_ms": max(r["p50_ms"] for r in runs), "other": sum(r["other"] for r in runs),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", choices=sorted(CATALOGS), default="demo")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    ap.add_argument("--p99-ms", type=float, default=250.0)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        raise SystemExit("wrk and redis-server are needed (listed in .ci/apt-packages.txt)")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            chroma_url, p = start_chroma(work)
            procs.append(p)
            redis_url, p = start_redis(work)
            procs.append(p)
            artifacts = prepare(args.catalog, work, chroma_url)
            env = {
                "ADSELECT_CHROMA_URL": chroma_url, "ADSELECT_REDIS_URL": redis_url, "ADSELECT_ARTIFACT_DIR": str(artifacts),
                "ADSELECT_SEQUENCE_ENABLED": "false", "ADSELECT_USER_KEY_SECRET": SECRET, "ADSELECT_MAX_INFLIGHT": "0",
            }  # fmt: skip
            hists = histories(CATALOGS[args.catalog]["impressions"], args.users, seed=0)
            bodies = []
            for r in range(2):  # each replica its own users: no user's caps are shared between the two wrk runs
                path = work / f"bodies_{r}.jsonl"
                with path.open("w") as fh:
                    for i, h in enumerate(hists):
                        fh.write(json.dumps({"user_id": f"rep{r}-{i}", "history": h, "k": args.k, "use_llm": False}) + "\n")
                bodies.append(path)
            replicas = []
            for r in range(2):
                port = free_port()
                replicas.append((start_server(work / f"replica{r}", port, work / f"replica{r}.log", env_overrides=env, workers=1), port))
            procs += [p for p, _ in replicas]
            urls = [f"http://127.0.0.1:{port}" for _, port in replicas]
            pair_run(urls, connections=2, seconds=2, bodies=bodies)  # warm both
            load = os.getloadavg()
            print(f"[{args.catalog}] cores={os.cpu_count()} load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            best = {1: 0.0, 2: 0.0}
            for c in args.connections:
                for n in (1, 2):
                    r = pair_run(urls[:n], connections=c, seconds=args.seconds, bodies=bodies[:n])
                    ok = r["p99_ms"] <= args.p99_ms and r["other"] == 0
                    if ok:
                        best[n] = max(best[n], r["rps"])
                    print(f"  replicas={n} c={r['c']:3d}: {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                          f"non-200 {r['other']}{'' if ok else '  (over the p99 limit)'}")  # fmt: skip
            load = os.getloadavg()
            ratio = best[2] / best[1] if best[1] else float("nan")
            print(f"  capacity at p99 <= {args.p99_ms:g} ms: one replica {best[1]:.0f} req/s, two replicas {best[2]:.0f} req/s, "
                  f"ratio {ratio:.2f}; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
        finally:
            for p in reversed(procs):
                stop(p)


if __name__ == "__main__":
    main()
