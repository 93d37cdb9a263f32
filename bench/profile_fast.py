"""cProfile of the fast path (use_llm false) in process: request body -> core -> Selector -> wire JSON.

    python bench/profile_fast.py --data-dir GAMES_VAR [--collection NAME] [--requests 1000] [--top 25]

Real Games histories (impressions_full_dev.jsonl, one distinct user per request), serving=True
(eligibility rules, frequency caps in SQLite in a scratch copy of the data dir, audit lines to a
disabled logger). Prints the top entries by own time and by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import tempfile
import time
from pathlib import Path

from common import CATALOGS, Settings, histories, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--catalog", default="games", choices=sorted(CATALOGS))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from selection.services import build_services
    from server.convert import to_core, to_wire
    from server.protocol import SelectRequestBody

    logging.getLogger("adselect.audit").disabled = True
    hists = histories(CATALOGS[args.catalog]["impressions"], args.requests + 50, seed=args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        # caps (data_dir/caps.sqlite) go to the scratch dir: the catalog dir is only read
        import shutil

        var = Path(scratch) / "var"
        shutil.copytree(args.data_dir, var, symlinks=True)
        upd = {"data_dir": var, "llm_enabled": False}
        if args.collection:
            upd["collection"] = args.collection
        s = Settings(_env_file=None).model_copy(update=upd)
        svc = build_services(s)
        sel = svc.selector

        def one(i: int, h: list[str]) -> bytes:
            body = SelectRequestBody(user_id=f"prof-{i}", history=h, k=5, use_llm=False)
            req = to_core(body, s)
            # the stages aselect runs on a worker thread, called here on this one so cProfile sees them
            started = time.perf_counter()
            d = sel._finish(req, sel.prior_stage(req), None, None, started)
            return to_wire(d).model_dump_json(by_alias=True).encode()

        for i, h in enumerate(hists[:50]):
            one(-i - 1, h)
        cpu0 = time.process_time()
        for i, h in enumerate(hists[50:]):
            one(10**6 + i, h)
        cpu_ms = (time.process_time() - cpu0) * 1000 / len(hists[50:])
        lat: list[float] = []
        prof = cProfile.Profile()
        prof.enable()
        for i, h in enumerate(hists[50:]):
            t = time.perf_counter()
            one(i, h)
            lat.append((time.perf_counter() - t) * 1000)
        prof.disable()
    print(f"[{args.catalog}] {len(svc.index)} ads; unprofiled: {cpu_ms:.2f} ms CPU per request; "
          f"{len(lat)} requests profiled: {summary(lat)}")  # fmt: skip
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        text = out.getvalue()
        print(text[text.find("   ncalls"):])


if __name__ == "__main__":
    main()
