"""Fast-path outputs for a fixed set of Games requests, to compare two versions of the code byte for byte.

    python bench/check_identical.py --data-dir GAMES_VAR --collection NAME --out before.jsonl [--requests 200]
    python bench/check_identical.py ... --out after.jsonl --compare before.jsonl

Each request (real Games histories, distinct users, then the first 40 users three times more so frequency caps bite;
every 7th request with a context that blocks a category and an advertiser) runs through the same in-process
stages the endpoint's worker thread runs (Selector._fast_path) on a fresh scratch copy of the data dir
(fresh caps). Per request one line: the wire response (request id fixed, timings removed), the decision's
full ranking, the audit record and the impression-log record (timings and clock fields removed). --compare
prints the first difference and exits 1 when any line differs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

from common import CATALOGS, histories, scratch_services

_CLOCK = ("timings_ms", "ts", "time", "now")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in _CLOCK}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, default=None)
    args = ap.parse_args()

    from kernel.types import RequestContext, SelectRequest
    from server.convert import to_wire

    audit_lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            audit_lines.append(record.getMessage())

    audit = logging.getLogger("adselect.audit")
    audit.addHandler(_Collect())
    audit.setLevel(logging.INFO)
    audit.propagate = False
    hists = histories(CATALOGS["games"]["impressions"], args.requests, seed=7)
    users = list(enumerate(hists)) + list(enumerate(hists[:40])) * 3
    now = datetime(2026, 6, 1, 12, 0, 0)
    with scratch_services(args.data_dir, collection=args.collection, fresh_state=True) as svc:
        sel = svc.selector
        records: list[dict] = []
        real_write = sel.impressions.write

        def write(record):
            records.append(json.loads(json.dumps(record)))
            return real_write(record)

        sel.impressions.write = write  # type: ignore[method-assign]
        lines = []
        for n, (i, h) in enumerate(users):
            ctx = RequestContext(now=now)
            if n % 7 == 3:
                ctx = RequestContext(now=now, blocked_categories=frozenset({"Accessories"}), blocked_advertisers=frozenset({"Nintendo"}))
            req = SelectRequest(user_id=f"check-{i}", history=h, k=5, use_llm=False, request_id=f"req-{n}", context=ctx)
            na, nr = len(audit_lines), len(records)
            d = sel._fast_path(req, time.perf_counter(), sel.turn(req))
            wire = json.loads(to_wire(d).model_dump_json(by_alias=True))
            out = {
                "n": n,
                "wire": _strip(wire),
                "ranking": d.ranking,
                "ineligible": d.ineligible,
                "capped": d.capped,
                "audit": [_strip(json.loads(x)) for x in audit_lines[na:]],
                "impression": [_strip(r) for r in records[nr:]],
            }
            lines.append(json.dumps(out, sort_keys=True))
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} requests written to {args.out}")
    if args.compare:
        old = args.compare.read_text().splitlines()
        diff = [k for k, (a, b) in enumerate(zip(old, lines)) if a != b]
        if diff or len(old) != len(lines):
            a, b = json.loads(old[diff[0]]), json.loads(lines[diff[0]])
            for key in a:
                if a[key] != b.get(key):
                    print(f"request {diff[0]} differs in {key!r}:\n  before {json.dumps(a[key])[:600]}\n  after  {json.dumps(b.get(key))[:600]}")
            print(f"DIFFERENT: {len(diff)} of {len(lines)} lines differ")
            sys.exit(1)
        print(f"IDENTICAL: all {len(lines)} lines equal")


if __name__ == "__main__":
    main()
