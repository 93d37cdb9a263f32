"""Where a real server's CPU per request goes: the app (adselect.app.factory, as `adselect serve` builds it) in
this process, driven over loopback by `wrk` with real Games histories, CPU per thread from /proc and a
cProfile table of the worker-thread part of each request (Selector._fast_path) and of the event loop.

    python bench/profile_server.py --data-dir GAMES_VAR [--collection NAME] [--seconds 10] [--connections 1] [--top 30]
    python bench/profile_server.py --data-dir GAMES_VAR --ab-setting fast_path_on_loop --blocks 8 --seconds 5 --connections 4

profile_fast.py times the core in a loop (its matrices stay in cache between requests); this one sees what a
server sees: the HTTP layer, the writer threads, and the core between idle gaps (the 26 MB Games matrix is
read from memory again; under other tenants' load the product costs ~2x its back-to-back time).

The server's log (audit lines included, as a real server writes them) goes to a scratch file. Prints, per thread (event loop, worker threads, audit/impression-log/served-rows writers), CPU ms per 200
answer over an unprofiled wrk run; then the worker-thread and event-loop tables (thread CPU clock) over a
second, profiled run. One worker process; caps and logs go to a scratch copy of the data dir.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import CATALOGS, REPO_ROOT, histories

from agent.local_server import free_port

LUA = REPO_ROOT / "bench" / "wrk_select.lua"


def thread_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (Python thread name or '?', user+system CPU seconds) for every thread of this process."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tid = int(task.name)
        out[tid] = (names.get(tid, "?"), (int(fields[11]) + int(fields[12])) / tick)
    return out


def run_wrk(port: int, bodies: Path, *, connections: int, seconds: int) -> int:
    env = dict(os.environ, BODIES=str(bodies), PATH_ONLY="/healthz")
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_RESULT"))
    print(f"  wrk c={connections} {seconds}s: {line}")
    return int(line.split("ok=")[1].split()[0])


def table(profs: list[cProfile.Profile], n: int, top: int, title: str) -> None:
    out = io.StringIO()
    st = pstats.Stats(profs[0], stream=out)
    for more in profs[1:]:
        st.add(more)
    print(f"\n== {title}: {1000 * st.total_tt / max(1, n):.2f} ms per request under cProfile ({n} requests)")
    for key in ("tottime", "cumulative"):
        st.sort_stats(key).print_stats(top)
    text = out.getvalue()
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def ab_blocks(server, port: int, bodies: Path, args: argparse.Namespace) -> None:
    """Unprofiled wrk blocks with `args.ab_setting` off and on in turn; CPU ms per 200 answer (all threads) per block."""
    app = server.config.loaded_app
    while not hasattr(app, "state"):  # uvicorn's wrappers (proxy headers, ...) around the FastAPI app
        app = app.app
    per: dict[bool, list[float]] = {False: [], True: []}
    for b in range(args.blocks):
        value = b % 2 == 1
        svc = app.state.services
        svc.settings = svc.settings.model_copy(update={args.ab_setting: value})
        before = thread_cpu()
        ok = run_wrk(port, bodies, connections=args.connections, seconds=args.seconds)
        after = thread_cpu()
        cpu = sum(c - before.get(t, ("", 0.0))[1] for t, (_, c) in after.items())
        per[value].append(1000 * cpu / max(1, ok))
        print(f"  block {b}: {args.ab_setting}={value}: {per[value][-1]:.2f} ms CPU per request, load {os.getloadavg()[0]:.2f}")
    for value, xs in per.items():
        print(f"  {args.ab_setting}={value}: mean {sum(xs) / len(xs):.2f} ms CPU per request over {len(xs)} blocks ({', '.join(f'{x:.2f}' for x in xs)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument(
        "--ab-setting", default=None, metavar="NAME",
        help="A boolean setting (e.g. fast_path_on_loop) flipped between unprofiled wrk blocks in this one server: "
        "CPU per request with it off and on, alternating, so both face the same machine load; no profile.",
    )  # fmt: skip
    ap.add_argument("--blocks", type=int, default=6, help="--ab-setting: blocks (alternating off, on, off, ...).")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="profile_server_"))
    var = scratch / "var"
    shutil.copytree(args.data_dir, var, symlinks=True, ignore=shutil.ignore_patterns("caps.sqlite*", "feedback.sqlite*", "impressions", "metrics"))
    for k in [k for k in os.environ if k.startswith("ADSELECT_") and k != "ADSELECT_SEQUENCE_MAX_TRAIN_S"]:
        del os.environ[k]
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.update({"ADSELECT_DATA_DIR": str(var), "ADSELECT_LLM_ENABLED": "false"})
    if args.collection:
        os.environ["ADSELECT_COLLECTION"] = args.collection
    server_log = open(scratch / "server.log", "w")  # the server's own log lines (audit included) go there, not here
    os.dup2(server_log.fileno(), 2)
    bodies = scratch / "bodies.jsonl"
    with bodies.open("w") as fh:
        for i, h in enumerate(histories(CATALOGS["games"]["impressions"], args.users, seed=0)):
            fh.write(json.dumps({"user_id": f"prof-{i}", "history": h, "k": 5, "use_llm": False}) + "\n")

    import logging

    import uvicorn

    import selection.pipeline as pipeline
    from adselect.app import factory

    worker_profs: dict[int, cProfile.Profile] = {}  # one per worker thread: a thread CPU clock is per thread
    loop_prof = cProfile.Profile(time.thread_time)
    profiling = threading.Event()
    fast_path = pipeline.Selector._fast_path

    def profiled_fast_path(self, *a, **kw):  # diagnostic wrapper of this bench's own process only
        if not profiling.is_set():
            return fast_path(self, *a, **kw)
        prof = worker_profs.get(threading.get_ident())
        if prof is None:  # wall clock: a thread CPU clock under two alternating pool threads gave negative totals
            prof = worker_profs[threading.get_ident()] = cProfile.Profile()
        return prof.runcall(fast_path, self, *a, **kw)

    pipeline.Selector._fast_path = profiled_fast_path  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(factory(), host="127.0.0.1", port=port, log_level="warning", log_config=None))
    logging.getLogger("adselect.audit").disabled = False

    async def toggle_loop_profile(on: bool) -> None:
        (loop_prof.enable if on else loop_prof.disable)()

    holder: dict = {}

    async def serve() -> None:
        holder["loop"] = asyncio.get_running_loop()
        await server.serve()

    def drive() -> None:
        import httpx

        while not server.started:
            time.sleep(0.2)
        loop = holder["loop"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        try:
            run_wrk(port, bodies, connections=2, seconds=3)  # warm-up
            if args.ab_setting:
                ab_blocks(server, port, bodies, args)
                return
            before = thread_cpu()
            ok = run_wrk(port, bodies, connections=args.connections, seconds=args.seconds)
            after = thread_cpu()
            print(f"\n== CPU per 200 answer by thread (unprofiled), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            total = 0.0
            for tid, (name, cpu) in sorted(after.items(), key=lambda kv: -(kv[1][1] - before.get(kv[0], ("", 0.0))[1])):
                d = cpu - before.get(tid, ("", 0.0))[1]
                total += d
                if d > 0:
                    print(f"  {name:28s} {1000 * d / ok:6.2f} ms")
            print(f"  {'all threads':28s} {1000 * total / ok:6.2f} ms per request ({ok} requests)")
            profiling.set()
            asyncio.run_coroutine_threadsafe(toggle_loop_profile(True), loop).result()
            ok = run_wrk(port, bodies, connections=args.connections, seconds=args.seconds)
            asyncio.run_coroutine_threadsafe(toggle_loop_profile(False), loop).result()
            profiling.clear()
            table(list(worker_profs.values()), ok, args.top, f"worker threads ({len(worker_profs)}; Selector._fast_path; wall clock)")
            table([loop_prof], ok, args.top, "event loop thread (HTTP, FastAPI, wire models; coroutine resumptions count as calls)")
        finally:
            server.should_exit = True

    threading.Thread(target=drive, name="driver", daemon=True).start()
    try:
        try:
            import uvloop  # what uvicorn's default loop="auto" picks when installed

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
        asyncio.run(serve())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
