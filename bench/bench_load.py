"""Overload: capacity of the fast path, then twice that offered load; what is accepted stays fast, the rest is shed.

    python bench/bench_load.py [--data-dir DIR] [--max-inflight 8] [--factor 2] [--deadline-ms 250]

1. Starts `adselect serve --no-llm` (uvicorn, 127.0.0.1) over the demo catalog with ADSELECT_MAX_INFLIGHT
   set; its log (INFO: audit lines and the access log) goes to a file.
2. Capacity: `--concurrency` closed-loop clients for `--capacity-seconds`; capacity = 200s per second.
3. Overload: open-loop arrivals at `--factor` x capacity for `--overload-seconds` (each request its own
   task, sent at its scheduled time whatever the server does). Accepted (200) latency is compared with
   the request deadline; refused answers (503 shed, 429 rate limited) with 10 ms.
4. Stops the server and counts its audit lines: there must be one per 200 response (capacity + overload
   + warm-up), none for a refused request.

Printed figures, not asserted. Latency is measured by the client, in another process on the same cores.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CATALOGS, ensure_ingested, histories, start_server, stop, summary

from agent.local_server import free_port

SHED_WITHIN_MS = 10.0


class Conn:
    """A minimal keep-alive HTTP/1.1 client connection: far less client CPU per request than httpx, so the
    load generator (on the same cores as the server) is not what saturates first."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def raw_requests(hists: list[list[str]], n: int, *, deadline_ms: int, start: int) -> list[bytes]:
    """`n` ready-to-send POST /v1/select requests (fast path, one user each), serialised up front."""
    out = []
    for i in range(start, start + n):
        body = json.dumps({"user_id": f"load-{i}", "history": hists[i % len(hists)], "k": 3, "use_llm": False, "deadline_ms": deadline_ms}).encode()
        head = f"POST /v1/select HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        out.append(head.encode() + body)
    return out


async def capacity(port: int, reqs: list[bytes], *, clients: int, seconds: float) -> tuple[float, list[float], int]:
    """Closed loop: `clients` connections, each sends the next request when the last one is answered."""
    lat: list[float] = []
    ok = 0
    it = iter(reqs)
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok
        conn = Conn("127.0.0.1", port)
        for raw in it:
            if time.monotonic() >= stop_at:
                break
            t = time.perf_counter()
            status, _ = await conn.request(raw)
            lat.append((time.perf_counter() - t) * 1000)
            ok += status == 200
        conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return ok / (time.monotonic() - t0), lat, ok


async def overload(port: int, reqs: list[bytes], *, rate: float, connections: int) -> tuple[list[tuple[int, float, float]], int]:
    """Open loop: request i is due at t0 + i / rate and goes out on the first free connection (a new one
    while fewer than `connections` are open). Latency is measured from when it was due, so time spent
    waiting for a free connection counts; also from when it was written (wire latency)."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    out: list[tuple[int, float, float]] = []  # (status, ms from due, ms on the wire)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = Conn("127.0.0.1", port)
        while (item := await queue.get()) is not None:
            due, raw = item
            t = time.perf_counter()
            try:
                status, _ = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors += 1
                conn.close()
                continue
            done = time.perf_counter()
            out.append((status, (done - due) * 1000, (done - t) * 1000))
        conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    t0 = time.perf_counter()
    for i, raw in enumerate(reqs):
        due = t0 + i / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        queue.put_nowait((due, raw))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return out, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="An ingested demo data dir (default: ingest into a temp dir).")
    ap.add_argument("--max-inflight", type=int, default=4, help="ADSELECT_MAX_INFLIGHT of the server.")
    ap.add_argument("--rate-limit", type=float, default=0.0, help="ADSELECT_RATE_LIMIT_PER_S (one client IP here); 0 = off.")
    ap.add_argument("--concurrency", type=int, default=4, help="Closed-loop connections while measuring capacity.")
    ap.add_argument("--connections", type=int, default=64, help="Most connections the open-loop client opens.")
    ap.add_argument("--capacity-seconds", type=float, default=10.0)
    ap.add_argument("--overload-seconds", type=float, default=15.0)
    ap.add_argument("--factor", type=float, default=2.0, help="Offered load as a multiple of the measured capacity.")
    ap.add_argument("--deadline-ms", type=int, default=250, help="deadline_ms sent with every request.")
    args = ap.parse_args()

    import uvloop

    scratch = Path(tempfile.mkdtemp(prefix="bench_load_"))
    data_dir = ensure_ingested("demo", args.data_dir, scratch)
    hists = histories(CATALOGS["demo"]["impressions"], 500)
    port = free_port()
    log_path = scratch / "server.log"
    proc = start_server(
        data_dir,
        port,
        log_path,
        env_overrides={
            "ADSELECT_MAX_INFLIGHT": str(args.max_inflight),
            "ADSELECT_RATE_LIMIT_PER_S": str(args.rate_limit),
            "ADSELECT_RATE_LIMIT_BURST": "50",
        },
    )
    try:
        warm_reqs = raw_requests(hists, 20, deadline_ms=args.deadline_ms, start=0)
        _, _, warm = uvloop.run(capacity(port, warm_reqs, clients=1, seconds=60))
        cap_reqs = raw_requests(hists, 100_000, deadline_ms=args.deadline_ms, start=20)
        cap, cap_lat, cap_ok = uvloop.run(capacity(port, cap_reqs, clients=args.concurrency, seconds=args.capacity_seconds))
        rate = args.factor * cap
        reqs = raw_requests(hists, int(rate * args.overload_seconds), deadline_ms=args.deadline_ms, start=200_000)
        results, errors = uvloop.run(overload(port, reqs, rate=rate, connections=args.connections))
    finally:
        stop(proc)

    audit = sum(" adselect.audit " in line for line in log_path.read_text(errors="replace").splitlines())
    by_status = collections.Counter(s for s, _, _ in results)
    accepted = [ms for s, ms, _ in results if s == 200]
    refused = [ms for s, ms, _ in results if s in (429, 503)]
    refused_wire = [ms for s, _, ms in results if s in (429, 503)]
    acc_p99 = float(np.percentile(accepted, 99)) if accepted else float("nan")
    ok_total = warm + cap_ok + len(accepted)

    print(f"server: adselect serve --no-llm (uvicorn, uvloop, httptools), demo catalog, ADSELECT_MAX_INFLIGHT={args.max_inflight}, "
          f"ADSELECT_RATE_LIMIT_PER_S={args.rate_limit}; {os.cpu_count()} CPUs shared with the client")  # fmt: skip
    print(f"capacity ({args.concurrency} closed-loop connections, {args.capacity_seconds:.0f}s): {cap:.1f} req/s; latency {summary(cap_lat)}")
    print(f"overload: offered {rate:.1f} req/s ({args.factor:g}x) for {args.overload_seconds:.0f}s = {len(reqs)} requests "
          f"over at most {args.connections} connections; transport errors {errors}")  # fmt: skip
    print(f"  statuses: {dict(sorted(by_status.items()))}; accepted {len(accepted) / args.overload_seconds:.1f} req/s")
    print(f"  accepted (200), from due time: {summary(accepted)}; p99 {'within' if acc_p99 <= args.deadline_ms else 'OVER'} the {args.deadline_ms} ms deadline")
    within = sum(ms <= SHED_WITHIN_MS for ms in refused)
    print(f"  refused (429/503), from due time: {summary(refused)}; {within}/{len(refused)} within {SHED_WITHIN_MS:.0f} ms")
    print(f"  refused (429/503), on the wire: {summary(refused_wire)}")
    print(f"audit lines {audit} vs 200 responses {ok_total} (warm-up {warm} + capacity {cap_ok} + overload {len(accepted)}): "
          f"{'equal' if audit == ok_total else 'MISMATCH'}")  # fmt: skip
    print(f"server log: {log_path}")


if __name__ == "__main__":
    main()
