"""Eval on Ray vs one process: the fast phase on the sampled Games impressions (6,000; `--task games_full`
for the 50,546 full-catalog ones), impressions/s of each, their ratio, and the identical-metrics check.

    python bench/bench_ray.py --data-dir DIR [--task games_sampled] [--limit N] [--impressions FILE] [--workers 2] [--ray ADDRESS]

Single process: eval.harness with protocol.workers=1 (no forked pool). Ray: `--ray` (a local Ray with 2
CPUs unless an address is given), `workers` FastActors. Both runs share the data dir, so the catalog,
behaviour and sequence model are built once (by a warm-up run over the first WARM impressions) and the
figures are the replay itself; the Ray figure includes starting the actors (each builds its Selector
once), printed apart as well. Last lines: the largest metric difference and how many impressions' fast
records differ between the two runs (both must be 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.config import load_task  # noqa: E402
from eval.distributed import RayBackend, ray_session  # noqa: E402
from eval.harness import run_eval  # noqa: E402
from kernel.settings import Settings  # noqa: E402

WARM = 200  # impressions of the warm-up run


def max_metric_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for system, metrics in a["metrics"].items():
        for name, x in metrics.items():
            y = b["metrics"][system][name]
            if (x is None) != (y is None):
                return math.inf
            if x is not None:
                worst = max(worst, abs(x - y))
    return worst


def differing_records(a: Path, b: Path) -> int:
    """Impressions whose fast records differ between two results.jsonl (each keyed by impression id)."""

    def fast(p: Path) -> dict[str, str]:
        out = {}
        with p.open() as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("phase") == "fast":
                    out[rec["impression_id"]] = json.dumps(rec, sort_keys=True)
        return out

    x, y = fast(a), fast(b)
    return sum(x.get(k) != y.get(k) for k in x.keys() | y.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="games_sampled")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--impressions", type=Path, default=None, help="another impressions file for the task (e.g. chosen impressions)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--ray", default="local", help="local (a local Ray, 2 CPUs), auto, or an address")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings() if args.data_dir is None else Settings(data_dir=args.data_dir)
    out = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    overrides = {"no_llm": True, "protocol": {"workers": 1}}
    if args.limit:
        overrides["data"] = {"limit": args.limit}
    if args.impressions:
        overrides["data"] = {**overrides.get("data", {}), "impressions": str(args.impressions.resolve())}
    task = load_task(args.task, overrides=overrides)

    # Builds (or finds) the catalog, behaviour and sequence model; a few impressions are enough for that.
    warm = task.model_copy(update={"data": task.data.model_copy(update={"limit": min(task.data.limit or WARM, WARM)})})
    run_eval(warm, settings=settings, out_dir=out / "warm", show_progress=False)
    t = time.perf_counter()
    single = run_eval(task, settings=settings, out_dir=out / "single", show_progress=False)
    single_wall = time.perf_counter() - t
    with ray_session(args.ray) as info:
        t = time.perf_counter()
        on_ray = run_eval(
            task, settings=settings, out_dir=out / "ray", show_progress=False,
            backend=RayBackend(workers=args.workers, batch_size=args.batch_size),
        )  # fmt: skip
        ray_wall = time.perf_counter() - t
    s, r = single["speed"]["fast"], on_ray["speed"]["fast"]
    diff = max_metric_diff(single, on_ray)
    print(f"task {args.task}: {single['n_impressions']} impressions; ray {info['ray_version']} {'local' if info['local'] else info['address']}, {info['cpus']} CPUs")
    print(f"single process : {s['impressions_per_s']} impressions/s (fast phase {s['seconds']}s; run wall {single_wall:.1f}s)")
    print(f"ray, {args.workers} actors : {r['impressions_per_s']} impressions/s (fast phase {r['seconds']}s incl. actor start; first result after {r['first_result_s']}s; run wall {ray_wall:.1f}s)")
    print(f"ratio ray/single: {r['impressions_per_s'] / s['impressions_per_s']:.2f}")
    print(f"identical metrics: max |diff| {diff:.3g} over {sum(len(m) for m in single['metrics'].values())} values -> {'OK' if diff <= 1e-9 else 'DIFFERENT'}")
    print(f"per-impression fast records that differ: {differing_records(out / 'single' / 'results.jsonl', out / 'ray' / 'results.jsonl')}")
    print(f"reports under {out}")


if __name__ == "__main__":
    main()
