"""Fast-path outputs for a fixed set of Games requests, to compare two versions of the code byte for byte.

    python bench/check_identical.py --data-dir GAMES_VAR --collection NAME --out before.jsonl [--requests 200]
    python bench/check_identical.py ... --out after.jsonl --compare before.jsonl

Each request (real Games histories, distinct users, then the first 40 users three times more so frequency caps bite;
every 7th request with a context that blocks a category and an advertiser) runs through the same in-process
stages the endpoint's worker thread runs (Selector._fast_path) on a fresh scratch copy of the data dir
(fresh caps). Per request one line: the wire response (request id fixed, timings removed), the decision's
full ranking, the audit record and the impression-log record (timings and clock fields removed); a last line
with digests of the raw bytes: the impression-log files as written, the audit lines as logged (timings masked).
--compare prints the first difference and exits 1 when any line differs. `--code DIR`: run DIR's code (another
checkout) under this script, so both sides are checked by the same script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from datetime import datetime
from pathlib import Path

if "--code" in sys.argv:  # before `common` is imported: its REPO_ROOT (put first on sys.path) is the code that runs
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve() / "bench"))

from common import CATALOGS, REPO_ROOT, histories, scratch_services  # noqa: E402

_CLOCK = ("timings_ms", "ts", "time", "now")
_TIMINGS = re.compile(r'"timings_ms":\{[^{}]*\}')


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
    ap.add_argument("--code", type=Path, default=None, metavar="DIR", help="Run DIR's code (another checkout) under this script.")
    args = ap.parse_args()
    print(f"code: {REPO_ROOT}")

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
        # The bytes as written: every impression-log file (no clock field in a record: `now` is fixed here) and
        # every audit line with only its timings masked, one digest each, compared like the lines above.
        sel.impressions.flush(30.0)
        log_bytes = b"".join(f.read_bytes() for f in sorted((Path(svc.settings.data_dir) / "impressions").glob("impressions-*.jsonl")))
        masked = "\n".join(_TIMINGS.sub('"timings_ms":{}', x) for x in audit_lines).encode()
        lines.append(json.dumps({
            "raw impression-log bytes": {"sha256": hashlib.sha256(log_bytes).hexdigest(), "bytes": len(log_bytes)},
            "raw audit lines (timings masked)": {"sha256": hashlib.sha256(masked).hexdigest(), "lines": len(audit_lines)},
        }, sort_keys=True))  # fmt: skip
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
