"""Capacity of the fast path under an external load generator (wrk), beside /healthz capacity in the same run.

    python bench/bench_wrk.py [--catalog demo --catalog games] [--games-data-dir DIR] [--collection NAME]
                              [--workers N] [--seconds 10] [--connections 1,2,4,8,16] [--p99-ms 25]
                              [--compare-checkout DIR] [--env KEY=VALUE ...] [--compare-env KEY=VALUE ...]

For each catalog: `adselect serve --no-llm --workers N` on 127.0.0.1 (this checkout), then `wrk` (one
thread, closed loop) at each connection count for --seconds, with bench/wrk_select.lua sending a
different user with a real history per request (demo: data/demo/impressions.jsonl; Games:
impressions_full_dev.jsonl). Capacity = the most 200 answers per second of a run whose p99 stayed
within --p99-ms; /healthz is swept the same way and the ratio printed (the figure that survives
machine noise). wrk runs on the same cores as the server. The load average is printed before and after.
At the end the server is stopped and its audit lines counted: one per 200 answer to /v1/select.

--compare-checkout DIR: the same sweep against a server running DIR's code (another git worktree, e.g. an
older commit), this checkout and DIR alternating per connection count, so both face the same machine
load; each run's users are its own (frequency caps in the shared data dir never carry over). --env / --compare-env
set server environment variables (ADSELECT_*) for this checkout's server / the other one; DIR may be this checkout
(one setting against another, e.g. --compare-checkout . --env ADSELECT_FAST_PATH_ON_LOOP=true).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from common import CATALOGS, REPO_ROOT, ensure_ingested, histories, start_server, stop

from agent.local_server import free_port

LUA = REPO_ROOT / "bench" / "wrk_select.lua"
RESULT = re.compile(r"WRK_RESULT ok=(\d+) other=(\d+) p50_us=(\d+) p99_us=(\d+) requests=(\d+) duration_us=(\d+)")


def wrk(url: str, *, connections: int, seconds: int, bodies: Path | None) -> dict:
    env = dict(os.environ, BODIES=str(bodies) if bodies else "", PATH_ONLY="/healthz")
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    m = RESULT.search(out)
    if m is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    ok, other, p50, p99, n, dur = (int(x) for x in m.groups())
    return {"c": connections, "ok": ok, "other": other, "rps": ok / (dur / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000}


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children (the uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(x) for x in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def sweep(url: str, args: argparse.Namespace, bodies: Path | None, label: str, pid: int) -> tuple[float, list[dict]]:
    runs: list[dict] = []
    for c in args.connections:
        cpu0 = tree_cpu_s(pid)
        r = wrk(url, connections=c, seconds=args.seconds, bodies=bodies)
        r["cpu_ms"] = (tree_cpu_s(pid) - cpu0) * 1000 / max(1, r["ok"] + r["other"])
        runs.append(r)
        print(f"  {label:9s} c={c:3d}: {r['rps']:8.0f} req/s (200s)  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"non-200 {r['other']}  server CPU {r['cpu_ms']:.2f} ms/request")  # fmt: skip
        if r["p99_ms"] > 8 * args.p99_ms:  # far past the knee: more connections only queue
            break
    within = [r["rps"] for r in runs if r["p99_ms"] <= args.p99_ms and r["other"] == 0]
    return (max(within) if within else 0.0), runs


def select_200s(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("adselect_http_requests_total{") and 'route="/v1/select"' in line and 'status="200"' in line
    ))  # fmt: skip


def audit_lines(log_path: Path) -> int:
    n = 0
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("logger") == "adselect.audit" and '"event":"impression"' in rec.get("message", ""):
            n += 1
    return n


def impression_records(data_dir: Path, before: set[Path]) -> int:
    """Impression-log records in the files the server opened since `before` was listed (one per served request)."""
    return sum(
        sum(1 for line in f.read_bytes().splitlines() if line.strip())
        for f in sorted((data_dir / "impressions").glob("impressions-*.jsonl")) if f not in before
    )  # fmt: skip


def worker_split(data_dir: Path, before: set[Path], workers: int) -> str:
    """Impression-log records per worker process (the file name carries the pid) since `before`: wrk keeps its
    connections open, and one worker may accept all of them, so a run can measure one core, not `workers`."""
    per_pid: dict[str, int] = {}
    for f in (data_dir / "impressions").glob("impressions-*.jsonl"):
        if f not in before:
            pid = f.name.split("-")[2]
            per_pid[pid] = per_pid.get(pid, 0) + sum(1 for line in f.read_bytes().splitlines() if line.strip())
    counts = sorted(per_pid.values(), reverse=True) + [0] * max(0, workers - len(per_pid))
    return "per worker " + "/".join(str(n) for n in counts)


def write_bodies(path: Path, catalog: str, hists: list[list[str]], k: int) -> None:
    tag = uuid.uuid4().hex[:8]  # this run's own users: caps in a reused data dir start empty for them
    with path.open("w") as fh:
        for i, h in enumerate(hists):
            fh.write(json.dumps({"user_id": f"wrk-{catalog}-{tag}-{i}", "history": h, "k": k, "use_llm": False}) + "\n")


def compare(catalog: str, data_dir: Path, args: argparse.Namespace, scratch: Path) -> None:
    """This checkout and --compare-checkout's, one server each (not at once), alternating per connection count."""
    hists = histories(CATALOGS[catalog]["impressions"], args.users, seed=args.seed)
    env = {"ADSELECT_COLLECTION": args.collection} if (catalog == "games" and args.collection) else {}
    other = args.compare_checkout.name if args.compare_checkout.resolve() != REPO_ROOT.resolve() else "this+env"
    names = {"this": None, other: args.compare_checkout}
    envs = {"this": {**env, **args.env}, other: {**env, **args.compare_env}}
    best: dict[str, float] = dict.fromkeys(names, 0.0)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    print(f"\n[{catalog}] this checkout vs {args.compare_checkout}: workers={args.workers or os.cpu_count()} users={len(hists)} k={args.k} "
          f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; environment this {envs['this']}, {other} {envs[other]}")  # fmt: skip
    for c in args.connections:
        for name, checkout in names.items():
            bodies = scratch / f"{catalog}_{name}_{c}_bodies.jsonl"
            write_bodies(bodies, catalog, hists, args.k)
            port = free_port()
            log_path = scratch / f"{catalog}_{name}_{c}.log"
            logs_before = set((data_dir / "impressions").glob("impressions-*.jsonl"))
            proc = start_server(data_dir, port, log_path, env_overrides=envs[name], workers=args.workers, checkout=checkout)
            try:
                url = f"http://127.0.0.1:{port}"
                wrk(url, connections=2, seconds=2, bodies=bodies)
                cpu0 = tree_cpu_s(proc.pid)
                r = wrk(url, connections=c, seconds=args.seconds, bodies=bodies)
                r["cpu_ms"] = (tree_cpu_s(proc.pid) - cpu0) * 1000 / max(1, r["ok"] + r["other"])
                time.sleep(1.0)  # what wrk left in flight at its deadline finishes
                served = select_200s(url)
            finally:
                stop(proc)
            lines, records = audit_lines(log_path), impression_records(data_dir, logs_before)
            counts = f"audit {lines} = records {records} = 200s {served}" if lines == records == served else f"DIFFERENT: audit {lines}, records {records}, 200s {served}"
            counts += f"  {worker_split(data_dir, logs_before, args.workers or os.cpu_count() or 1)}"
            cpu[name].append(r["cpu_ms"])
            if r["p99_ms"] <= args.p99_ms and r["other"] == 0:
                best[name] = max(best[name], r["rps"])
            print(f"  {name:>12} c={c:3d}: {r['rps']:8.0f} req/s (200s)  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                  f"non-200 {r['other']}  server CPU {r['cpu_ms']:.2f} ms/request  load {os.getloadavg()[0]:.2f}  {counts}")  # fmt: skip
    (a, b) = names
    print(f"  capacity at p99 <= {args.p99_ms:g} ms: {a} {best[a]:.0f} req/s, {b} {best[b]:.0f} req/s (ratio {best[a] / best[b] if best[b] else float('nan'):.3f}); "
          f"server CPU ms/request, mean over the runs: {a} {sum(cpu[a]) / len(cpu[a]):.2f}, {b} {sum(cpu[b]) / len(cpu[b]):.2f}; "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip


def run(catalog: str, data_dir: Path, args: argparse.Namespace, scratch: Path) -> None:
    bodies = scratch / f"{catalog}_bodies.jsonl"
    hists = histories(CATALOGS[catalog]["impressions"], args.users, seed=args.seed)
    write_bodies(bodies, catalog, hists, args.k)
    port = free_port()
    log_path = scratch / f"{catalog}_server.log"
    env = {"ADSELECT_COLLECTION": args.collection} if (catalog == "games" and args.collection) else {}
    env.update(args.env)
    logs_before = set((data_dir / "impressions").glob("impressions-*.jsonl"))
    proc = start_server(data_dir, port, log_path, env_overrides=env, workers=args.workers)
    url = f"http://127.0.0.1:{port}"
    try:
        wrk(url, connections=2, seconds=2, bodies=bodies)
        load_before = os.getloadavg()
        print(f"\n[{catalog}] workers={args.workers or os.cpu_count()} users={len(hists)} k={args.k} "
              f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")  # fmt: skip
        cap, runs = sweep(url, args, bodies, "select", proc.pid)
        health, _ = sweep(url, args, None, "healthz", proc.pid)
        load_after = os.getloadavg()
        time.sleep(1.0)  # what wrk left in flight at its deadline finishes (wrk does not count those answers)
        served = select_200s(url)  # summed over the workers (/metrics)
    finally:
        stop(proc)
    lines = audit_lines(log_path)
    records = impression_records(data_dir, logs_before)  # the warm-up's answers are in both counts
    ratio = cap / health if health else float("nan")
    print(f"  capacity at p99 <= {args.p99_ms:g} ms: /v1/select {cap:.0f} req/s, /healthz {health:.0f} req/s, ratio {ratio:.3f}")
    print(f"  audit lines {lines}, impression-log records {records} for {served} select 200s counted by the server "
          f"({'equal' if lines == served == records else 'DIFFERENT'}); {worker_split(data_dir, logs_before, args.workers or os.cpu_count() or 1)}; "
          f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")  # fmt: skip


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"KEY=VALUE expected, not {text!r}")
    return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", choices=sorted(CATALOGS))
    ap.add_argument("--games-data-dir", type=Path, default=None)
    ap.add_argument("--collection", default=None, help="Chroma collection of the Games data dir (default: ads)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--p99-ms", type=float, default=25.0)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-checkout", type=Path, default=None, metavar="DIR", help="Also sweep DIR's code (another worktree), alternating.")
    ap.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE", help="Server environment (this checkout).")
    ap.add_argument(
        "--compare-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
        help="Server environment of the --compare-checkout server (DIR may be this checkout: the same code, two settings).",
    )  # fmt: skip
    args = ap.parse_args()
    args.env, args.compare_env = dict(args.env), dict(args.compare_env)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk (listed in .ci/apt-packages.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for catalog in args.catalog or ["demo", "games"]:
            given = args.games_data_dir if catalog == "games" else None
            (compare if args.compare_checkout is not None else run)(catalog, ensure_ingested(catalog, given, scratch), args, scratch)


if __name__ == "__main__":
    main()
