"""Off-policy evaluation on a traffic simulation over real Amazon Games dev users (figures, not asserts).

The logging arm (`default` + softmax exploration over every candidate) serves the users; a simulated user
clicks their logged next purchase when served and examined (`--decay` per position). Each target variant
(`popularity`, `covisit`, `default` without exploration) is then served on-policy to the same users for
its true CTR, and estimated from the log + feedback with IPS, SNIPS and DR. Repeating with `--seeds N`
gives each estimator's coverage and mean absolute error. The figures go to stdout and `--out DIR/ope_sim.json`:

    {"variants": {"<name>": {"on_policy_ctr": x, "ips": {"value": v, "ci": [lo, hi]}, "snips": {...},
                             "dr": {...}, "n": n, "ess": e, ...}}, "seeds": [...], "summary": {...}}

(`variants` is the first seed's run; `seeds` holds every run; `summary` the coverage and errors.)

    python bench/bench_ope.py --out /tmp/ope            # 5,000 users, k = 1, 5 seeds (a few minutes)
    python bench/bench_ope.py --k 3 --decay 0.7 --out /tmp/ope_slate

Today it runs against `eval.ope_sim.StandInService` (stand-in policies from popularity and co-visitation,
the real impression log writer, feedback store and exploration). SEAM for the running endpoint: pass
`--endpoint URL` once `HttpService` below is written: a class with `serve` (POST /v1/select with the
arm forced for the simulation, reading each ad's `propensity` and the `arm`), `click` (POST /v1/events)
and `records` (the service's impression log joined with its feedback store, read from its data dir).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SHARED_DATA  # puts the repository on sys.path
from eval.ope_sim import (  # noqa: E402
    BehaviourTables,
    DirectModel,
    SimConfig,
    SimResult,
    StandInService,
    load_users,
    read_rows,
    run_simulation,
    stand_in_variants,
)

DEV = SHARED_DATA / "amazon_games_6k" / "impressions_sampled_dev.jsonl"
ESTIMATORS = ("ips", "snips", "dr")


class HttpService:
    """SEAM: the running endpoint behind the simulation's `Service` protocol (to be written with the server)."""

    def __init__(self, base_url: str, *, api_key: str | None, data_dir: Path):
        raise NotImplementedError(
            "wire POST /v1/select (arm forced, per-ad propensity), POST /v1/events and the data dir's log + feedback"
        )


def summarise(runs: list[SimResult]) -> dict:
    out: dict = {}
    for name in runs[0].variants:
        row: dict = {}
        for est in ESTIMATORS:
            vals = [(r.variants[name][est], r.variants[name]["on_policy_ctr"]) for r in runs if est in r.variants[name]]
            if not vals:
                continue
            row[est] = {
                "coverage": float(np.mean([e["ci"][0] <= t <= e["ci"][1] for e, t in vals])),
                "mean_abs_error": float(np.mean([abs(e["value"] - t) for e, t in vals])),
                "mean_ci_width": float(np.mean([e["ci"][1] - e["ci"][0] for e, _ in vals])),
            }
        row["mean_ess"] = float(np.mean([r.variants[name]["ess"] for r in runs]))
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=5000, help="simulated users (the dev file has 6,000; --fit-users are kept apart)")
    ap.add_argument("--fit-users", type=int, default=1000, help="users the direct model (Platt pCTR) is fitted on")
    ap.add_argument("--k", type=int, default=1, help="ads per slate (k > 1: cascade IPS / DR)")
    ap.add_argument("--decay", type=float, default=1.0, help="examination probability decay per position")
    ap.add_argument("--temperature", type=float, default=1.0, help="logging softmax temperature over z-scored scores")
    ap.add_argument("--top-m", type=int, default=20, help="logging exploration pool")
    ap.add_argument("--clip", type=float, default=None, help="clip importance weights from above")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5, help="independent runs (user order, exploration, clicks)")
    ap.add_argument("--endpoint", default=None, help="SEAM: base URL of a running service (not wired yet)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    rows = read_rows(DEV)
    tables = BehaviourTables.from_rows(rows)
    runs: list[SimResult] = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        fit = load_users(rows, n=args.fit_users, seed=seed)
        users = load_users(rows, n=args.users, seed=seed, offset=args.fit_users)
        direct = DirectModel.fit(fit, tables)
        with tempfile.TemporaryDirectory() as tmp:
            if args.endpoint:
                service = HttpService(args.endpoint, api_key=None, data_dir=Path(tmp))
            else:
                service = StandInService(
                    variants=stand_in_variants(temperature=args.temperature, top_m=args.top_m),
                    tables=tables, direct=direct, data_dir=Path(tmp),
                )  # fmt: skip
            cfg = SimConfig(k=args.k, decay=args.decay, seed=seed, n_bootstrap=args.bootstrap, clip=args.clip)
            t = time.perf_counter()
            res = run_simulation(service, users, cfg)
            service.close()
        runs.append(res)
        print(f"seed {seed}: {res.n_logged} logged impressions, logging CTR {res.logging_ctr:.4f} ({time.perf_counter() - t:.1f}s)")
        for name, v in res.variants.items():
            cells = " ".join(
                f"{e}={v[e]['value']:.4f} [{v[e]['ci'][0]:.4f}, {v[e]['ci'][1]:.4f}]" for e in ESTIMATORS if e in v
            )
            print(f"  {name:11s} on-policy {v['on_policy_ctr']:.4f}  {cells}  ess={v['ess']:.0f}")
    summary = summarise(runs)
    print(f"\n{args.seeds} seeds x {args.users} users, k={args.k}, decay={args.decay}, T={args.temperature}, "
          f"clip={args.clip}: coverage of the 95% CI / mean |error| / mean CI width")  # fmt: skip
    for name, row in summary.items():
        cells = "  ".join(
            f"{e} {row[e]['coverage']:.2f}/{row[e]['mean_abs_error']:.4f}/{row[e]['mean_ci_width']:.4f}" for e in ESTIMATORS if e in row
        )
        print(f"  {name:11s} {cells}  mean ESS {row['mean_ess']:.0f}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "variants": runs[0].variants,
        "seeds": [r.to_json() for r in runs],
        "summary": summary,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out / "ope_sim.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'ope_sim.json'}")


if __name__ == "__main__":
    main()
