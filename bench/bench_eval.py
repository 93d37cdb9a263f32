"""Benchmark the eval harness on the 6,000 sampled Games dev impressions.

    python bench/bench_eval.py                 # fast path (LLM off): impressions/s, best of --repeat runs
    python bench/bench_eval.py --llm 10        # + the local LLM on 10 impressions, then an identical re-run:
                                               #   impressions/s of each and the re-run's cache hit rate
    python bench/bench_eval.py --compare-checkout ../base --repeat 3   # + another checkout's code, runs alternating:
                                               #   the ratio of the best runs is the figure a shared machine moves least

Each fast-path run is a fresh process (`adselect eval run --no-llm` as the CLI runs it, results.jsonl
written); the load averages are printed beside the figures, and so is the fast phase's CPU time (this
process and its worker processes): impressions per CPU-second, the figure other tenants' load moves least. The per-system share is CPU time in this
process over the same impressions: the core's prior stage (the `default` system: every other system
reads its features), each baseline ranker, the metrics and the JSON record.

The catalog is ingested into Chroma (and behaviour learned) on the first run under the data dir and
reused after, so the numbers are the replay itself. Also prints the core's prior stage alone
(Selector.prior_stage per impression) to show how much of the time the harness adds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernel.settings import Settings  # noqa: E402
from eval.config import load_task, resolve_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="games_sampled")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llm", type=int, default=0, help="LLM sample size (0 = skip the LLM part)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--compare-checkout", type=Path, default=None, help="Another checkout (e.g. the base commit) to run alternating with this one.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings() if args.data_dir is None else Settings(data_dir=args.data_dir)
    out_root = Path(tempfile.mkdtemp(prefix="bench-eval-"))

    fast_task = load_task(args.task, overrides={"no_llm": True})
    checkouts = {"this": REPO} | ({"compare": args.compare_checkout.resolve()} if args.compare_checkout else {})
    runs: dict[str, list[dict]] = {k: [] for k in checkouts}
    loads = [_load()]
    for i in range(args.repeat):
        for name, where in checkouts.items():  # alternating: both see the same stretch of machine load
            runs[name].append(_fast_run(where, task=args.task, data_dir=args.data_dir, out_dir=out_root / f"{name}{i}"))
            loads.append(_load())
    for name, where in checkouts.items():
        rates = [r["impressions_per_s"] for r in runs[name]]
        per_cpu = [r["per_cpu_s"] for r in runs[name]]
        last = runs[name][-1]
        print(f"fast path [{name}: {where}]: {last['n']} impressions, {last['workers']} workers, impressions/s per run {rates}, "
              f"best {max(rates)}; impressions per CPU-second (parent + workers) {per_cpu}, best {max(per_cpu)}; "
              f"default nDCG@10 {last['ndcg10']:.4f}")  # fmt: skip
    if args.compare_checkout:
        for key, what in (("impressions_per_s", "impressions/s"), ("per_cpu_s", "impressions per CPU-second")):
            best = {k: max(r[key] for r in v) for k, v in runs.items()}
            print(f"  ratio this / compare, {what} (best of {args.repeat} each): {best['this'] / best['compare']:.2f}x")
    print(f"  load averages (1/5/15 min) before and after each run: {' | '.join(loads)}")
    print(f"  setup {runs['this'][-1]['setup']}")
    _shares(fast_task, settings)

    if args.llm:
        from eval.harness import run_eval

        task = load_task(args.task, overrides={"llm": {"sample": args.llm}, "systems": ["default", "llm", "default+llm"]})
        for name in ("first", "re-run"):
            t = time.perf_counter()
            rep = run_eval(task, settings=settings, out_dir=out_root / f"llm-{name}", show_progress=False)
            wall = time.perf_counter() - t
            sp, cache = rep["speed"]["llm"], rep["llm"]["cache"]
            print(
                f"llm {name}: {sp['impressions']} impressions in {sp['seconds']:.1f}s = {sp['impressions_per_s']} impressions/s "
                f"(wall {wall:.1f}s incl. setup); cache {json.dumps(cache)}"
            )
    print(f"reports under {out_root}")


_RUN = """
import json, os, sys, pathlib
sys.path.insert(0, ".")
from kernel.settings import Settings
from eval.config import load_task
import eval.harness as harness
from eval.harness import run_eval
cpu = {}
phase = harness._fast_phase
def timed_phase(*a, **k):  # CPU of the fast phase alone: this process + its (joined) worker processes
    t0 = os.times()
    out = phase(*a, **k)
    t1 = os.times()
    cpu["s"] = (t1.user + t1.system + t1.children_user + t1.children_system) - (t0.user + t0.system + t0.children_user + t0.children_system)
    return out
harness._fast_phase = timed_phase
d = sys.argv[2]
settings = Settings() if not d else Settings(data_dir=pathlib.Path(d))
rep = run_eval(load_task(sys.argv[1], overrides={"no_llm": True}), settings=settings, out_dir=pathlib.Path(sys.argv[3]), show_progress=False)
fast = rep["speed"]["fast"]
print(json.dumps({"n": rep["n_impressions"], "impressions_per_s": fast["impressions_per_s"], "workers": fast.get("workers"),
                  "per_cpu_s": round(fast["impressions"] / cpu["s"], 1),
                  "ndcg10": rep["metrics"]["default"]["ndcg@10"], "setup": rep["speed"]["setup"]}))
"""


def _fast_run(checkout: Path, *, task: str, data_dir: Path | None, out_dir: Path) -> dict:
    """One fast-path eval run of `checkout`'s code in a fresh process (its own imports, its own fork)."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN, task, str(data_dir.resolve()) if data_dir else "", str(out_dir)],
        cwd=checkout, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _shares(task, settings: Settings) -> None:
    """CPU time per impression of each part of the fast record, in this process, over the task's impressions."""
    from eval.bm25 import BM25Index
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.metrics import metrics_by_protocol
    from eval.rankers import FastRankers
    from eval.report import metric_names
    from eval.systems import FAST_SYSTEMS, SYSTEMS, resolve_systems

    env = prepare_env(
        settings, ads_path=resolve_path(task.data.ads),
        train_paths=[resolve_path(p) for p in task.data.train] or [resolve_path(task.data.impressions)], show_progress=False,
    )  # fmt: skip
    sel = env.services.selector
    systems = [x for x in resolve_systems(task.systems) if x in FAST_SYSTEMS and (x != "sequence" or sel.generator.sequence is not None)]
    r = FastRankers(selector=sel, bm25=BM25Index(env.services.index.ads) if "bm25" in systems else None, systems=systems, seed=task.protocol.seed)
    items = load_impressions(resolve_path(task.data.impressions), catalog=env.services.index.row, limit=task.data.limit).items
    for imp in items:
        imp.candidates = r.canonical(imp.candidates)
    if any(i.candidates is None for i in items):
        print("  per-system share: logged impressions only")
        return
    names = metric_names(task.protocol.recall_ks)
    metrics_of = metrics_by_protocol([m for m in names if not m.startswith("recall@")], names)
    cpu: dict[str, float] = {}

    def clock(key: str, t0: float) -> float:
        t1 = time.process_time()
        cpu[key] = cpu.get(key, 0.0) + t1 - t0
        return t1

    from eval.baselines import LoggedView
    from eval.harness import fast_record

    t = time.process_time()
    with r.batch(items):
        t = clock("sequence states (one batch)", t)
        stages = [sel.prior_stage(r.request(i)) for i in items]
        t = clock("prior stage (core)", t)
    for imp, stage in zip(items, stages):
        ids = [c.ad.ad_id for c in stage.candidates]
        rows = [r.index.row[i] for i in ids]
        view = LoggedView(imp=imp, stage=stage, ids=ids, rows=rows, tiebreak=r.res.tiebreak[rows])
        t = clock("views", t)
        for name in r.systems:
            SYSTEMS[name].logged(r.res, view)
            t = clock(f"ranker {name}", t)
    with r.batch(items):
        res = [r.run(i) for i in items]  # not timed: the parts above
        t = time.process_time()
        for imp, x in zip(items, res):
            metrics_of(imp, x.rankings, x.pool_size)
        t = clock("metrics", t)
        recs = [fast_record(i, r, metrics_of) for i in items]
    t = time.process_time()
    for rec in recs:
        json.dumps(rec, ensure_ascii=False)
    t = clock("JSON line (parent)", t)
    total = sum(cpu.values())
    print(f"  CPU per impression in one process, {len(items)} impressions (load {_load()}): {1e6 * total / len(items):.0f} us; shares:")
    for key, v in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"    {key:28s} {1e6 * v / len(items):7.1f} us  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
