"""The fast path (use_llm false) at POST /v1/select on a real server process, with a numpy floor.

    python bench/bench_endpoint.py [--catalog demo --catalog games] [--games-data-dir DIR] [--requests 1000]
    python bench/bench_endpoint.py --catalog games --games-data-dir DIR --sequence-ab   # with vs without the sequence prior
    python bench/bench_endpoint.py --catalog games --games-data-dir DIR --compare-checkout ../base   # this code vs another worktree's

For each catalog: `adselect serve --no-llm` (uvicorn) on 127.0.0.1, one keep-alive client sending
requests one after another (bounded by --requests and --max-seconds) with real user histories
(demo: data/demo/impressions.jsonl; Games: impressions_full_dev.jsonl, one distinct user per request).
The floor is, in this process over the same stored embeddings, the least any dense retriever must
do per request: pool the history vectors, one matrix-vector product over the catalog, top-k.
The ratio endpoint / floor is the price of everything else (HTTP, JSON, Chroma HNSW, co-visitation,
collaborative vectors, fusion, eligibility, frequency caps, audit log).

With --sequence-ab both servers run at once (one with the sequence prior and source, one without) and
every history is sent to both, the order alternating, so the with/without ratio is measured under the
same machine load; the served ads are compared to show the prior is really on in one of them.
--compare-checkout DIR does the same with a server running another checkout's code (e.g. a `git worktree`
of an older commit): before/after under one machine load.

Two floors: back to back (the catalog matrix stays in cache between requests), and with --floor-pause-ms
of idle between requests, as a server sees it (the 26 MB Games matrix is then read from memory again:
the product is memory-bound, and on a shared machine the other tenants evict it). The load average is
printed before and after.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from common import CATALOGS, Settings, ensure_ingested, histories, start_server, stop, summary

from selection.services import make_store
from agent.local_server import free_port
from retrieval.features import build_profile


def floor_ms(
    data_dir: Path, hists: list[list[str]], *, k: int, decay: float, collection: str | None = None, pause_s: float = 0.0
) -> tuple[list[float], int]:
    """Brute-force numpy top-k per request over the same embeddings (single BLAS thread, like the server);
    `pause_s` idle before each request (not timed)."""
    from threadpoolctl import threadpool_limits

    s = Settings(_env_file=None, data_dir=data_dir)
    index = make_store(s.model_copy(update={"collection": collection}) if collection else s).load_index()
    out: list[float] = []
    with threadpool_limits(limits=1, user_api="blas"):
        for h in hists:
            if pause_s:
                time.sleep(pause_s)
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


def _variants(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Server env per variant: one server, or (--sequence-ab) one with and one without the sequence prior, or
    (--compare-checkout) this checkout and another."""
    if args.compare_checkout is not None:
        return {"this checkout": {}, f"{args.compare_checkout.name} checkout": {}}
    if args.sequence_ab:
        return {"with sequence": {"ADSELECT_SEQUENCE_ENABLED": "true"}, "without sequence": {"ADSELECT_SEQUENCE_ENABLED": "false"}}
    return {"endpoint": {}}


def run(catalog: str, data_dir: Path, args: argparse.Namespace, scratch: Path) -> None:
    """Every variant's server is up at once; each history goes to all of them, the order rotating per request,
    so machine load falls on every variant alike."""
    n = args.requests + args.warmup
    hists = histories(CATALOGS[catalog]["impressions"], n, seed=args.seed)
    collection = args.collection if catalog == "games" and args.collection else None
    variants = _variants(args)
    procs, ports = {}, {}
    lat: dict[str, list[float]] = {v: [] for v in variants}
    server_total: dict[str, list[float]] = {v: [] for v in variants}
    errors = dict.fromkeys(variants, 0)
    differ = 0  # requests whose served ads differ between the variants
    timed: list[list[str]] = []
    load_before = os.getloadavg()
    try:
        for name, extra in variants.items():
            env = ({"ADSELECT_COLLECTION": collection} if collection else {}) | extra
            ports[name] = free_port()
            slug = name.replace(" ", "_")
            checkout = args.compare_checkout if name.endswith(" checkout") and name != "this checkout" else None
            procs[name] = start_server(
                data_dir, ports[name], scratch / f"{catalog}_{slug}_server.log", env_overrides=env or None, workers=args.workers, checkout=checkout
            )  # fmt: skip
        clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{ports[name]}", timeout=30) for name in variants}
        try:
            ads = clients[next(iter(variants))].get("/healthz").json()["ads"]
            names = list(variants)
            run_tag = uuid.uuid4().hex[:8]
            started = time.perf_counter()
            for i, h in enumerate(hists):
                served = {}
                for j in range(len(names)):
                    name = names[(i + j) % len(names)]
                    # a user of its own per variant and run: frequency caps (shared through the data dir's SQLite)
                    # never see another variant's or an earlier run's reservations, so the served ads compare
                    user = f"bench-{catalog}-{args.seed}-{run_tag}-{names.index(name)}-{i}"
                    body = {"user_id": user, "history": h, "k": args.k, "use_llm": False}
                    t = time.perf_counter()
                    res = clients[name].post("/v1/select", json=body)
                    ms = (time.perf_counter() - t) * 1000
                    if res.status_code != 200:
                        errors[name] += 1
                    elif i >= args.warmup:
                        lat[name].append(ms)
                        data = res.json()
                        server_total[name].append(data["timings_ms"]["total"])
                        served[name] = [a.get("ad_id") for a in data.get("ads", [])]
                if i >= args.warmup and len(served) == len(names):
                    timed.append(h)
                    differ += len({tuple(v) for v in served.values()}) > 1
                if time.perf_counter() - started > args.max_seconds:
                    break
            wall = time.perf_counter() - started
        finally:
            for c in clients.values():
                c.close()
    finally:
        for proc in procs.values():
            stop(proc)
    load_after = os.getloadavg()
    decay = Settings(_env_file=None).recency_decay
    floor, n_ads = floor_ms(data_dir, timed, k=args.k, decay=decay, collection=collection)
    cold, _ = floor_ms(data_dir, timed, k=args.k, decay=decay, collection=collection, pause_s=args.floor_pause_ms / 1000)
    hist_len = np.mean([len(h) for h in timed]) if timed else float("nan")
    print(f"\n[{catalog}] {ads} ads served, data dir {data_dir}; {len(timed)} timed requests per variant after {args.warmup} warm-up, "
          f"k={args.k}, mean history {hist_len:.1f}, non-200: {errors}; load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}")  # fmt: skip
    f50, f99 = np.percentile(floor, [50, 99]) if floor else (float("nan"), float("nan"))
    c50, c99 = np.percentile(cold, [50, 99]) if cold else (float("nan"), float("nan"))
    for name in variants:
        print(f"  {name:<16} client wall : {summary(lat[name])}  ({len(hists) / wall:.0f} req/s sequential, all variants)")
        print(f"  {name:<16} server total: {summary(server_total[name])}")
        if lat[name]:
            e50, e99 = np.percentile(lat[name], [50, 99])
            print(f"  {name:<16} endpoint/floor: p50 {e50 / f50:.1f}x  p99 {e99 / f99:.1f}x   "
                  f"endpoint/idle-between floor: p50 {e50 / c50:.1f}x  p99 {e99 / c99:.1f}x")  # fmt: skip
    print(f"  numpy floor ({n_ads} ads), back to back: {summary(floor)}")
    print(f"  numpy floor, {args.floor_pause_ms:g} ms idle before each request: {summary(cold)}")
    if args.sequence_ab and all(lat.values()):
        (w50, w99), (o50, o99) = (np.percentile(lat[v], [50, 99]) for v in variants)
        print(f"  with/without sequence : p50 {w50:.2f} / {o50:.2f} ms = {w50 / o50:.2f}x   p99 {w99:.2f} / {o99:.2f} ms = {w99 / o99:.2f}x")
        print(f"  served ads differ between the variants on {differ}/{len(timed)} requests (the prior is really on in one)")
    if args.compare_checkout is not None and all(lat.values()):
        (t50, t99), (o50, o99) = (np.percentile(lat[v], [50, 99]) for v in variants)
        (s50, s99), (q50, q99) = (np.percentile(server_total[v], [50, 99]) for v in variants)
        print(f"  this / {args.compare_checkout.name}: client p50 {t50:.2f} / {o50:.2f} ms = {t50 / o50:.2f}x   p99 {t99:.2f} / {o99:.2f} ms = "
              f"{t99 / o99:.2f}x; server total p50 {s50:.2f} / {q50:.2f}, p99 {s99:.2f} / {q99:.2f} ms")  # fmt: skip
        print(f"  served ads differ between the checkouts on {differ}/{len(timed)} requests")


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
    ap.add_argument(
        "--sequence-ab", action="store_true",
        help="Two servers in this run, with and without the sequence prior (ADSELECT_SEQUENCE_ENABLED), requests interleaved.",
    )
    ap.add_argument(
        "--compare-checkout", type=Path, default=None, metavar="DIR",
        help="Two servers in this run: this checkout and DIR's (another git worktree), requests interleaved.",
    )
    ap.add_argument("--floor-pause-ms", type=float, default=5.0, help="Idle before each request of the second numpy floor.")
    args = ap.parse_args()
    if args.compare_checkout is not None and args.sequence_ab:
        ap.error("--compare-checkout and --sequence-ab are two different A/B runs: one at a time")
    given = {"demo": args.demo_data_dir, "games": args.games_data_dir}
    with tempfile.TemporaryDirectory(prefix="bench_endpoint_") as tmp:
        for catalog in args.catalog or ["demo", "games"]:
            run(catalog, ensure_ingested(catalog, given[catalog], Path(tmp)), args, Path(tmp))


if __name__ == "__main__":
    main()
