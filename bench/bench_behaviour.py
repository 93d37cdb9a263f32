"""Behaviour learning at 1x, 4x and 16x the Games histories: seconds and peak memory per size, the growth
per 4x of data, and the pre-vectorised implementation (the tests' oracle) against today's at 1x.

    python bench/bench_behaviour.py [--sizes 1,4,16] [--no-old] [--ray] [--blas-threads 1] [--ads PATH --impressions PATH]

1x is the histories of ../shared/data/amazon_games_6k/impressions_full_dev.jsonl as logged (50,546 users).
kx adds (k-1) x as many resampled users with new ids: each copies a random real user's history and
replaces one random item, and every other with probability --noise, by one drawn from the logged item
frequencies, so nearly all new histories are distinct (learning counts each distinct history once) and
keep most of the co-visit structure.

Each size runs in a fresh process: "peak MB" is the growth of the peak resident set (getrusage) over the
process's size once the histories are in memory, so it covers numpy, scipy's C++ buffers and Python alike.
"count" is popularity + co-visitation + same-history co-occurrence (`count_behaviour`); "cf" is the PMI
matrix and its truncated SVD (ARPACK, as before: its iterations depend on the spectrum, not only on the
size). BLAS threads default to 1: two threads on two shared cores made the SVD five times slower here.
`--ray`: the counting also on a local Ray (2 CPUs, 2 actors: eval.distributed.behaviour, as `adselect ingest
--ray`), per size: its seconds (actor start included), the driver's peak MB, and whether the tables equal
the single-process ones at 1x.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CATALOGS, REPO_ROOT, Settings

GAMES = CATALOGS["games"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def scaled_histories(
    scale: int, *, ads: Path, impressions: Path, noise: float, seed: int
) -> tuple[list[str], list[list[str]]]:
    from retrieval.records import read_ads

    ids = [a.ad_id for a in read_ads(ads)]
    row = {a: i for i, a in enumerate(ids)}
    with open(impressions, encoding="utf-8") as fh:
        real = [json.loads(line)["history"] for line in fh]
    out = [list(h) for h in real]
    if scale > 1:
        rng = np.random.default_rng(seed)
        coded = [np.array([row[a] for a in h if a in row], dtype=np.int64) for h in real]
        freq = np.bincount(np.concatenate(coded), minlength=len(ids)).astype(np.float64)
        cdf = np.cumsum(freq / freq.sum())
        for u in rng.integers(0, len(real), size=(scale - 1) * len(real)):
            h = coded[u].copy()
            swap = rng.random(len(h)) < noise
            swap[rng.integers(0, len(h))] = True  # at least one: a new user, not a copy learning would drop
            h[swap] = np.minimum(np.searchsorted(cdf, rng.random(int(swap.sum()))), len(ids) - 1)
            out.append([ids[r] for r in h])
    return ids, out


def worker(args: argparse.Namespace) -> None:
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads)
    ids, hists = scaled_histories(args.scale, ads=args.ads, impressions=args.impressions, noise=args.noise, seed=args.seed)
    base_rss = _rss_mb()
    out: dict = {"users": len(hists), "events": sum(map(len, hists))}
    t0 = time.perf_counter()
    if args.worker == "ray":
        from eval.distributed import ray_session
        from eval.distributed.behaviour import RayBehaviourCounter

        with ray_session():
            t0 = time.perf_counter()
            counts = RayBehaviourCounter(workers=2)(hists, ids, window=args.window, decay=args.decay)
            out["count_s"] = time.perf_counter() - t0
        fwd, pop, cf, nh = _tables(counts, out, t0=t0, base_rss=base_rss, cf_dims=args.cf_dims)
    elif args.worker == "old":
        sys.path.insert(0, str(REPO_ROOT / "tests" / "retrieval"))
        from reference_behaviour import reference_learn

        timings: dict[str, float] = {}
        tables = reference_learn(hists, ids, window=args.window, decay=args.decay, cf_dims=args.cf_dims, timings=timings)
        out["total_s"] = time.perf_counter() - t0
        out["count_s"] = timings["count_s"]
        out["cf_s"] = out["total_s"] - out["count_s"]
        fwd, pop, cf, nh = tables["forward"], tables["popularity"], tables["cf"], tables["n_histories"]
    else:
        from retrieval.behaviour import count_behaviour  # what BehaviourStats.learn calls

        counts = count_behaviour(hists, ids, window=args.window, decay=args.decay)
        out["count_s"] = time.perf_counter() - t0
        fwd, pop, cf, nh = _tables(counts, out, t0=t0, base_rss=base_rss, cf_dims=args.cf_dims)
    out.update(peak_mb=_peak_mb() - base_rss, histories=nh, pairs=fwd.nnz)
    if args.dump:
        np.savez(args.dump, indptr=fwd.indptr, indices=fwd.indices, data=fwd.data, pop=pop, cf=cf if cf is not None else np.zeros(0))
    print(json.dumps(out))


def _tables(counts, out: dict, *, t0: float, base_rss: float, cf_dims: int):
    """The tables from counted co-visits (as BehaviourStats.from_counts): the collaborative vectors timed into `out`."""
    from retrieval.behaviour import collaborative_vectors

    out["count_peak_mb"] = _peak_mb() - base_rss
    t1 = time.perf_counter()
    cf = collaborative_vectors(counts, dims=cf_dims)
    out["cf_s"] = time.perf_counter() - t1
    out["total_s"] = time.perf_counter() - t0
    out["co_pairs"] = counts.co.nnz
    return counts.forward.astype(np.float32), counts.popularity.astype(np.float32), cf, counts.n_histories


def run(kind: str, scale: int, args: argparse.Namespace, dump: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--scale", str(scale), "--window", str(args.window),
           "--decay", str(args.decay), "--cf-dims", str(args.cf_dims), "--noise", str(args.noise),
           "--seed", str(args.seed), "--blas-threads", str(args.blas_threads),
           "--ads", str(args.ads), "--impressions", str(args.impressions)]  # fmt: skip
    if dump:
        cmd += ["--dump", str(dump)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{kind} {scale}x failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(old: Path, new: Path) -> str:
    a, b = np.load(old), np.load(new)
    same_pattern = np.array_equal(a["indptr"], b["indptr"]) and np.array_equal(a["indices"], b["indices"])
    ulps = np.abs(a["data"].view(np.int32).astype(np.int64) - b["data"].view(np.int32).astype(np.int64)) if same_pattern else None
    parts = [
        f"popularity {'identical' if np.array_equal(a['pop'], b['pop']) else 'DIFFERENT'}",
        f"co-visit pairs {'identical' if same_pattern else 'DIFFERENT'}",
        f"cf {'identical' if np.array_equal(a['cf'], b['cf']) else 'max diff %.3g' % np.abs(a['cf'] - b['cf']).max()}",
    ]
    if ulps is not None:
        parts.append(f"co-visit weights: {np.mean(ulps == 0):.1%} bit-identical, max {ulps.max()} float32 ulp"
                     " (the old code summed in float32 in an unspecified order; today float64, rounded once)")  # fmt: skip
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = Settings(_env_file=None)
    ap.add_argument("--ads", type=Path, default=GAMES["ads"], help="Catalog (its ids index the tables).")
    ap.add_argument("--impressions", type=Path, default=GAMES["impressions"], help="Logged impressions: the 1x histories.")
    ap.add_argument("--sizes", default="1,4,16", help="Comma-separated multiples of the Games histories.")
    ap.add_argument("--window", type=int, default=s.covisit_window)
    ap.add_argument("--decay", type=float, default=s.recency_decay)
    ap.add_argument("--cf-dims", type=int, default=s.cf_dims)
    ap.add_argument("--noise", type=float, default=0.1, help="Per-item replacement probability of resampled users.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", type=int, default=1, help="0 = the BLAS default.")
    ap.add_argument("--no-old", action="store_true", help="Skip the old implementation at 1x.")
    ap.add_argument("--ray", action="store_true", help="Also count on a local Ray (2 actors) at every size.")
    ap.add_argument("--worker", choices=["old", "new", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"window {args.window}, decay {args.decay}, cf dims {args.cf_dims}, noise {args.noise}, BLAS threads {args.blas_threads or 'default'}")
    print(f"{'size':>5} {'users':>9} {'events':>10} {'histories':>10} {'fwd pairs':>10} {'co pairs':>10} {'count s':>8} {'cf s':>7} {'total s':>8} {'count MB':>8} {'peak MB':>8}")
    with tempfile.TemporaryDirectory(prefix="bench_behaviour_") as tmp:
        rows = {}
        for k in sizes:
            r = run("new", k, args, Path(tmp) / "new.npz" if k == 1 else None)
            rows[k] = r
            print(f"{k:>4}x {r['users']:>9} {r['events']:>10} {r['histories']:>10} {r['pairs']:>10} {r['co_pairs']:>10} "
                  f"{r['count_s']:>8.2f} {r['cf_s']:>7.2f} {r['total_s']:>8.2f} {r['count_peak_mb']:>8.0f} {r['peak_mb']:>8.0f}", flush=True)  # fmt: skip
        for a, b in zip(sizes, sizes[1:]):
            ra, rb = rows[a], rows[b]
            print(f"growth {a}x -> {b}x ({b / a:.0f}x data, {rb['events'] / ra['events']:.2f}x events): "
                  f"count {rb['count_s'] / ra['count_s']:.2f}x, cf {rb['cf_s'] / ra['cf_s']:.2f}x, "
                  f"total {rb['total_s'] / ra['total_s']:.2f}x time; peak memory count {rb['count_peak_mb'] / max(ra['count_peak_mb'], 1e-9):.2f}x, "
                  f"total {rb['peak_mb'] / max(ra['peak_mb'], 1e-9):.2f}x, "
                  f"co-visit pairs {rb['pairs'] / ra['pairs']:.2f}x, co pairs {rb['co_pairs'] / ra['co_pairs']:.2f}x")  # fmt: skip
        for k in sizes if args.ray else []:
            r, new = run("ray", k, args, Path(tmp) / "ray.npz" if k == 1 else None), rows[k]
            same = f"; tables vs one process: {compare(Path(tmp) / 'new.npz', Path(tmp) / 'ray.npz')}" if k == 1 else ""
            print(f"ray, 2 actors, {k}x: count {r['count_s']:.2f}s (incl. actor start) vs {new['count_s']:.2f}s in one process "
                  f"({r['count_s'] / new['count_s']:.2f}x); driver peak {r['peak_mb']:.0f} MB vs {new['peak_mb']:.0f} MB{same}", flush=True)  # fmt: skip
        if not args.no_old and 1 in rows:
            old = run("old", 1, args, Path(tmp) / "old.npz")
            new = rows[1]
            print(f"old vs new at 1x: count {old['count_s']:.2f}s vs {new['count_s']:.2f}s ({old['count_s'] / new['count_s']:.2f}x), "
                  f"cf {old['cf_s']:.2f}s vs {new['cf_s']:.2f}s (same SVD), total {old['total_s']:.2f}s vs {new['total_s']:.2f}s "
                  f"({old['total_s'] / new['total_s']:.2f}x); peak {old['peak_mb']:.0f} MB vs {new['peak_mb']:.0f} MB "
                  f"({old['peak_mb'] / max(new['peak_mb'], 1e-9):.2f}x)")  # fmt: skip
            print(f"old vs new tables at 1x: {compare(Path(tmp) / 'old.npz', Path(tmp) / 'new.npz')}")


if __name__ == "__main__":
    main()
