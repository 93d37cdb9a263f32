"""The fast path (use_llm false) at POST /v1/select on a real server process, with a numpy floor.

    python bench/bench_endpoint.py [--catalog demo --catalog games] [--games-data-dir DIR] [--requests 1000]

For each catalog: `adselect serve --no-llm` (uvicorn) on 127.0.0.1, one keep-alive client sending
requests one after another (bounded by --requests and --max-seconds) with real user histories
(demo: data/demo/impressions.jsonl; Games: impressions_full_dev.jsonl, one distinct user per request).
The floor is, in this process over the same stored embeddings, the least any dense retriever must
do per request: pool the history vectors, one matrix-vector product over the catalog, top-k.
The ratio endpoint / floor is the price of everything else (HTTP, JSON, Chroma HNSW, co-visitation,
collaborative vectors, fusion, eligibility, frequency caps, audit log).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import CATALOGS, Settings, ensure_ingested, histories, start_server, stop, summary

from selection.services import make_store
from agent.local_server import free_port
from retrieval.features import build_profile


def floor_ms(data_dir: Path, hists: list[list[str]], *, k: int, decay: float, collection: str | None = None) -> tuple[list[float], int]:
    """Brute-force numpy top-k per request over the same embeddings (single BLAS thread, like the server)."""
    from threadpoolctl import threadpool_limits

    s = Settings(_env_file=None, data_dir=data_dir)
    index = make_store(s.model_copy(update={"collection": collection}) if collection else s).load_index()
    out: list[float] = []
    with threadpool_limits(limits=1, user_api="blas"):
        for h in hists:
            t = time.perf_counter()
            rows, _ = index.rows(h)
            profile = build_profile(index, rows, decay=decay)
            if profile.vector is not None:
                sims = index.vectors @ profile.vector
                sims[rows] = -np.inf  # history excluded, as the endpoint does
                top = np.argpartition(-sims, k)[:k]
                top = top[np.argsort(-sims[top])]
            out.append((time.perf_counter() - t) * 1000)
    return out, len(index)


def run(catalog: str, data_dir: Path, args: argparse.Namespace, scratch: Path) -> None:
    n = args.requests + args.warmup
    hists = histories(CATALOGS[catalog]["impressions"], n, seed=args.seed)
    port = free_port()
    collection = args.collection if catalog == "games" and args.collection else None
    env = {"ADSELECT_COLLECTION": collection} if collection else None
    proc = start_server(data_dir, port, scratch / f"{catalog}_server.log", env_overrides=env, workers=args.workers)
    lat: list[float] = []
    server_total: list[float] = []
    errors = 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            ads = client.get("/healthz").json()["ads"]
            started = time.perf_counter()
            for i, h in enumerate(hists):
                body = {"user_id": f"bench-{catalog}-{args.seed}-{i}", "history": h, "k": args.k, "use_llm": False}
                t = time.perf_counter()
                res = client.post("/v1/select", json=body)
                ms = (time.perf_counter() - t) * 1000
                if res.status_code != 200:
                    errors += 1
                elif i >= args.warmup:
                    lat.append(ms)
                    server_total.append(res.json()["timings_ms"]["total"])
                if time.perf_counter() - started > args.max_seconds:
                    break
            wall = time.perf_counter() - started
    finally:
        stop(proc)
    floor, n_ads = floor_ms(data_dir, hists[args.warmup :][: len(lat)], k=args.k, decay=Settings(_env_file=None).recency_decay, collection=collection)
    hist_len = np.mean([len(h) for h in hists[args.warmup :][: len(lat)]])
    print(f"\n[{catalog}] {ads} ads served, data dir {data_dir}; {len(lat)} timed requests after {args.warmup} warm-up, "
          f"k={args.k}, mean history {hist_len:.1f}, {errors} non-200")  # fmt: skip
    print(f"  endpoint (client wall) : {summary(lat)}  ({len(hists) / wall:.0f} req/s sequential)")
    print(f"  server timings total   : {summary(server_total)}")
    print(f"  numpy floor ({n_ads} ads): {summary(floor)}")
    f50, f99 = np.percentile(floor, [50, 99])
    e50, e99 = np.percentile(lat, [50, 99])
    print(f"  ratio endpoint/floor   : p50 {e50 / f50:.1f}x  p99 {e99 / f99:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", choices=sorted(CATALOGS), help="Repeatable; default: demo and games.")
    ap.add_argument("--demo-data-dir", type=Path, default=None, help="An already-ingested demo data dir.")
    ap.add_argument("--games-data-dir", "--data-dir", type=Path, default=None, help="An already-ingested Games data dir (else ingest: minutes).")
    ap.add_argument("--collection", default=None, help="Chroma collection of the Games data dir (default: ads).")
    ap.add_argument("--workers", type=int, default=None, help="adselect serve --workers (default: one per CPU).")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=600, help="Stop sending after this long.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    given = {"demo": args.demo_data_dir, "games": args.games_data_dir}
    with tempfile.TemporaryDirectory(prefix="bench_endpoint_") as tmp:
        for catalog in args.catalog or ["demo", "games"]:
            run(catalog, ensure_ingested(catalog, given[catalog], Path(tmp)), args, Path(tmp))


if __name__ == "__main__":
    main()
