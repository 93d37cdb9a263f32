"""Benchmark the eval harness on the 6,000 sampled Games dev impressions.

    python bench/bench_eval.py                 # fast path (LLM off): impressions/s, best of --repeat runs
    python bench/bench_eval.py --llm 10        # + the local LLM on 10 impressions, then an identical re-run:
                                               #   impressions/s of each and the re-run's cache hit rate

The catalog is ingested into Chroma (and behaviour learned) on the first run under the data dir and
reused after, so the numbers are the replay itself. Also prints the core's prior stage alone
(Selector.prior_stage per impression) to show how much of the time the harness adds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.settings import Settings  # noqa: E402
from eval.config import load_task, resolve_path  # noqa: E402
from eval.harness import run_eval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="games_sampled")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llm", type=int, default=0, help="LLM sample size (0 = skip the LLM part)")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings() if args.data_dir is None else Settings(data_dir=args.data_dir)
    out_root = Path(tempfile.mkdtemp(prefix="bench-eval-"))

    fast_task = load_task(args.task, overrides={"no_llm": True})
    rates = []
    for i in range(args.repeat):
        rep = run_eval(fast_task, settings=settings, out_dir=out_root / f"fast{i}", show_progress=False)
        rates.append(rep["speed"]["fast"]["impressions_per_s"])
    print(f"fast path: {rep['n_impressions']} impressions, impressions/s per run {rates}, best {max(rates)}")
    print(f"  default nDCG@10 {rep['metrics']['default']['ndcg@10']:.4f}, setup {rep['speed']['setup']}")
    _prior_stage_only(fast_task, settings)

    if args.llm:
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


def _prior_stage_only(task, settings: Settings) -> None:
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.rankers import FastRankers

    env = prepare_env(
        settings, ads_path=resolve_path(task.data.ads),
        train_paths=[resolve_path(p) for p in task.data.train] or [resolve_path(task.data.impressions)], show_progress=False,
    )  # fmt: skip
    sel = env.services.selector
    items = load_impressions(resolve_path(task.data.impressions), catalog=env.services.index.row, limit=task.data.limit).items
    r = FastRankers(selector=sel, bm25=None, systems=[])
    reqs = [r.request(i) for i in items]
    t = time.perf_counter()
    for req in reqs:
        sel.prior_stage(req)
    s = time.perf_counter() - t
    print(f"  core prior_stage alone: {len(reqs) / s:.0f} impressions/s ({1e6 * s / len(reqs):.0f} us each)")


if __name__ == "__main__":
    main()
