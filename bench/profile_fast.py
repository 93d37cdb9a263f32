"""cProfile of the fast path (use_llm false) in process: request body -> core -> Selector -> wire JSON.

    python bench/profile_fast.py --data-dir GAMES_VAR [--collection NAME] [--requests 1000] [--top 25]
    python bench/profile_fast.py --data-dir GAMES_VAR --eval games_sampled [--requests 6000]   # the eval fast phase

--eval: the `adselect eval run --no-llm` fast phase of TASK in one process (the harness's fast_records
over the impressions + their results lines), first unprofiled (CPU ms per impression, the figure a shared
machine's load moves least), then under cProfile with a CPU-time clock.

Real Games histories (impressions_full_dev.jsonl, one distinct user per request), serving=True
(eligibility rules, frequency caps in SQLite in a scratch copy of the data dir, audit lines to a
disabled logger). Prints the top entries by own time and by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import time
from pathlib import Path

from common import CATALOGS, Settings, histories, scratch_services, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--collection", default=None)
    ap.add_argument("--catalog", default="games", choices=sorted(CATALOGS))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default=None, metavar="TASK", help="Profile the eval fast phase of this task instead.")
    args = ap.parse_args()
    if args.eval:
        return profile_eval(args)

    from server.convert import to_core, to_wire
    from server.protocol import SelectRequestBody

    logging.getLogger("adselect.audit").disabled = True
    hists = histories(CATALOGS[args.catalog]["impressions"], args.requests + 50, seed=args.seed)
    with scratch_services(args.data_dir, collection=args.collection) as svc:  # caps go to the scratch copy
        sel = svc.selector

        def one(i: int, h: list[str]) -> bytes:
            body = SelectRequestBody(user_id=f"prof-{i}", history=h, k=5, use_llm=False)
            req = to_core(body, svc.settings)
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
          f"{len(lat)} requests profiled: {summary(lat)}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        text = out.getvalue()
        print(text[text.find("   ncalls"):])


def print_tables(prof: cProfile.Profile, top: int) -> None:
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
        text = out.getvalue()
        print(text[text.find("   ncalls"):])


def profile_eval(args) -> None:
    import json

    from eval.config import load_task, resolve_path
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.exposure import read_catalog
    from eval.harness import fast_records
    from eval.metrics import metrics_by_protocol
    from eval.rankers import FastRankers
    from eval.report import metric_names
    from eval.systems import FAST_SYSTEMS, resolve_systems

    task = load_task(args.eval, overrides={"no_llm": True})
    s = Settings().model_copy(update={"data_dir": args.data_dir})
    ads_path, imp_path = resolve_path(task.data.ads), resolve_path(task.data.impressions)
    env = prepare_env(s, ads_path=ads_path, train_paths=[resolve_path(p) for p in task.data.train] or [imp_path], show_progress=False)
    sel = env.services.selector
    sel.generator.use_chroma = task.protocol.use_chroma
    names = metric_names(task.protocol.recall_ks)
    catalog = read_catalog(ads_path)
    bids = {a.ad_id: a.bid for a in env.services.index.ads} if any(m["bid"] is not None for m in catalog.values()) else None
    metrics_of = metrics_by_protocol([m for m in names if not m.startswith("recall@")], names, bids=bids)
    systems = [x for x in resolve_systems(task.systems) if x in FAST_SYSTEMS and (x != "sequence" or sel.generator.sequence is not None)]
    from eval.bm25 import BM25Index

    bm25 = BM25Index(env.services.index.ads) if "bm25" in systems else None
    rankers = FastRankers(
        selector=sel, bm25=bm25, systems=systems, n_retrieve=task.protocol.n_retrieve, use_chroma=task.protocol.use_chroma,
        seed=task.protocol.seed, rank_by=env.settings.rank_by,
    )  # fmt: skip
    items = load_impressions(imp_path, catalog=env.services.index.row, limit=args.requests).items
    for imp in items:
        imp.candidates = rankers.canonical(imp.candidates)

    def run_all() -> None:
        with open(os.devnull, "w", encoding="utf-8") as sink:
            for rec in fast_records(items, rankers, metrics_of):  # as the harness's workers: one block
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")  # as ResultsLog.append

    run_all()  # warm
    cpu0, t0 = time.process_time(), time.perf_counter()
    run_all()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    run_all()
    prof.disable()
    print(f"[eval {args.eval}] {len(items)} impressions, systems {','.join(systems)}, one process, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}: {1000 * cpu / len(items):.3f} ms CPU per impression "
          f"= {len(items) / cpu:.0f} impressions per CPU-second (wall {len(items) / wall:.0f}/s)")  # fmt: skip
    print_tables(prof, args.top)


if __name__ == "__main__":
    main()
