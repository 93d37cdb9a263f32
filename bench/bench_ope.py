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

`--service stand-in` (the default) runs against `eval.ope_sim.StandInService` (stand-in policies from
popularity and co-visitation, the real impression log writer, feedback store and exploration).
`--service http` runs it through a RUNNING `adselect serve` (eval.ope_http: a subprocess on loopback over a
data dir holding the Games catalog and its behaviour tables, copied from --games-data-dir): the logging arm
`default_explore` (the service's weights + softmax exploration), targets `popularity` and `covisit`
(one-feature weights files) and `default` (no exploration), each switched in by POST /admin/reload; clicks
through POST /v1/events; the records read from the service's impression log + feedback store. It also
measures the log's write cost: p50/p99 of /v1/select with the impression log on vs off (`--latency N`), and
refits the pCTR calibration (eval.log_calibration, as `adselect eval calibrate`) on every decision served with
the shipped weights (the logging arm and the on-policy `default` arm, all seeds; clicks are reported for both),
holding out `--cal-holdout` of the users by keyed hash: log loss, NE, Σp/Σy, ECE over `--cal-bins` quantile bins
with its bootstrap interval and noise floor (also per cluster of user + ad: a user shown the same ad again
clicks again, so repeated rows are not new outcomes), on the held-out users and cross-fitted over every row,
and `--out DIR/reliability.png`; then the same refit on the logging arm alone (`calibration_refit_logging_arm`). The coverage lines count the seeds whose 95% CI holds the on-policy CTR.

    python bench/bench_ope.py --service http --users 2000 --seeds 1 --out /tmp/ope_http
    python bench/bench_ope.py --service http --users-from full --users 15000 --seeds 1 --out /tmp/ope_full

`--users-from full` draws distinct users from impressions_full_dev.jsonl (50,546) instead of replaying the
sampled dev file's 6,000 each seed: each user's 20-candidate list is the next purchase + 19 uniformly random
catalog ads not in the history, seeded per user (the sampling of `adselect eval sample-logged`). The 10,458
users the shipped fusion was not fitted on (its meta.exclude) come first; beyond them the users overlap the
fusion's training users. The calibration refit is fitted and judged on this simulated log, held out by user, so
the overlap does not bias its pooled figures, but the fusion may score its training users differently
(`--users 10458` keeps to fresh users; the README splits the 20,000-user run's held-out rows by group).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SHARED_DATA  # puts the repository on sys.path
from selection.impression_log import iter_log_records  # noqa: E402
from eval.calibration import ECE_BINS, HOLDOUT_SHARE  # noqa: E402
from eval.ope_sim import (  # noqa: E402
    BehaviourTables,
    DirectModel,
    SimConfig,
    SimResult,
    StandInService,
    load_users,
    read_rows,
    run_simulation,
    sampled_users,
    stand_in_variants,
)

DEV = SHARED_DATA / "amazon_games_6k" / "impressions_sampled_dev.jsonl"
FULL_DEV = SHARED_DATA / "amazon_games_6k" / "impressions_full_dev.jsonl"
ADS = SHARED_DATA / "amazon_games_6k" / "ads.jsonl"
ESTIMATORS = ("ips", "snips", "dr")


GAMES_VAR = Path("/tmp/games_var_eval")  # a data dir `adselect eval` already filled with the Games catalog


def games_data_dir(source: Path, work: Path) -> tuple[Path, str]:
    """A serving data dir with the Games catalog (Chroma, copied) and behaviour tables (copied from the eval
    layout data_dir/eval/behaviour/<key>/behaviour/<collection> to the serving one data_dir/behaviour/<collection>)."""
    import shutil

    tables = sorted(source.glob("behaviour/*/behaviour.json")) or sorted(source.glob("eval/behaviour/*/behaviour/*/behaviour.json"))
    if not (source / "chroma").is_dir() or not tables:
        raise SystemExit(f"{source} holds no Games catalog + behaviour tables: `adselect ingest` (or `adselect eval run`) into it first")
    collection = tables[0].parent.name
    data = work / "data"
    shutil.copytree(source / "chroma", data / "chroma")
    shutil.copytree(tables[0].parent, data / "behaviour" / collection)
    return data, collection


def one_feature_weights(path: Path, feature: str) -> str:
    from retrieval.features import FEATURES
    from selection.fusion import FusionModel

    m = FusionModel.hand_tuned()
    m.coef = np.array([1.0 if f == feature else 0.0 for f in FEATURES])
    m.save(path)
    return str(path)


LOGGING_ARM = "default_explore"


def http_arms(work: Path, *, temperature: float, top_m: int) -> dict:
    return {
        LOGGING_ARM: {"exploration": {"method": "softmax", "temperature": temperature, "top_m": top_m}},
        "popularity": {"weights": one_feature_weights(work / "popularity.json", "popularity")},
        "covisit": {"weights": one_feature_weights(work / "covisit.json", "covisit")},
        "default": {},
    }


def latency(proc, users, n: int) -> dict:
    """p50/p99 ms of POST /v1/select (k=1, 20 logged candidates) as the client sees it."""
    import httpx

    times = []
    with httpx.Client(base_url=proc.base_url, headers={"X-API-Key": proc.api_key}, timeout=60) as c:
        for u in users[:n]:
            body = {"user_id": u.user_id, "history": u.history, "candidates": u.candidates, "k": 1, "use_llm": False}
            t = time.perf_counter()
            c.post("/v1/select", json=body).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
    return {"n": len(times), "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def outside_fusion_fit() -> set[str]:
    """The users the shipped fusion weights were not fitted on: those of the files its `meta.exclude` names
    (the sampled dev file's 6,000 and games_full's first 5,000 impressions of the full dev file)."""
    from eval.data import read_user_ids
    from kernel.settings import REPO_ROOT
    from selection.fusion import FusionModel

    users: set[str] = set()
    for src in FusionModel.load(None).meta.get("exclude") or []:
        users |= read_user_ids(REPO_ROOT / src["path"], limit=src["limit"])
    return users


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
                "seeds_covered": int(sum(e["ci"][0] <= t <= e["ci"][1] for e, t in vals)),
                "seeds": len(vals),
                "mean_abs_error": float(np.mean([abs(e["value"] - t) for e, t in vals])),
                "mean_ci_width": float(np.mean([e["ci"][1] - e["ci"][0] for e, _ in vals])),
            }
        row["mean_ess"] = float(np.mean([r.variants[name]["ess"] for r in runs]))
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=5000, help="simulated users (the sampled dev file has 6,000, the full one 50,546; --fit-users are kept apart)")
    ap.add_argument("--users-from", choices=("sampled", "full"), default="sampled",
                    help="sampled: the users of impressions_sampled_dev.jsonl with their logged 20-candidate lists (6,000; "
                         "each seed replays the same users). full: distinct users of impressions_full_dev.jsonl (50,546), each "
                         "list the next purchase + --n-random catalog ads not in the history, seeded per user "
                         "(eval.ope_sim.sampled_users); the users the shipped fusion was NOT fitted on come first (its "
                         "meta.exclude: the sampled dev users + games_full's first 5,000, 10,458 users), then the others, "
                         "which overlap the fusion's training users. The calibration refit is fitted and judged on the simulated "
                         "log, held out by user, so both sides share the same mix (the pooled figures are not biased by the "
                         "overlap); the fusion may still score its training users differently: --users 10458 keeps to fresh users")  # fmt: skip
    ap.add_argument("--n-random", type=int, default=19, help="full: random catalog negatives per user's list")
    ap.add_argument("--candidate-seed", type=int, default=0, help="full: seed of every user's sampled list (with the user id)")
    ap.add_argument("--fit-users", type=int, default=1000, help="users the direct model (Platt pCTR) is fitted on")
    ap.add_argument("--k", type=int, default=1, help="ads per slate (k > 1: cascade IPS / DR)")
    ap.add_argument("--decay", type=float, default=1.0, help="examination probability decay per position")
    ap.add_argument("--temperature", type=float, default=1.0, help="logging softmax temperature over z-scored scores")
    ap.add_argument("--top-m", type=int, default=20, help="logging exploration pool")
    ap.add_argument("--clip", type=float, default=None, help="clip importance weights from above")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5, help="independent runs (user order, exploration, clicks)")
    ap.add_argument("--service", choices=("stand-in", "http"), default="stand-in", help="stand-in policies, or a running adselect serve")
    ap.add_argument("--games-data-dir", type=Path, default=GAMES_VAR, help="http: data dir holding the ingested Games catalog + behaviour")
    ap.add_argument("--latency", type=int, default=300, help="http: requests timed with the impression log on and off")
    ap.add_argument("--cal-holdout", type=float, default=HOLDOUT_SHARE, help="http: share of users held out to judge the calibration refit")
    ap.add_argument("--cal-method", default="auto", help="http: calibration refit method (auto, platt, isotonic)")
    ap.add_argument("--cal-arm", default=None, help="http: refit on this arm's decisions only (default: every arm served with the shipped weights)")
    ap.add_argument("--cal-bins", type=int, default=ECE_BINS, help="http: equal-count bins of the reliability table and ECE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    extra: dict = {}

    if args.users_from == "full":
        from retrieval.records import read_ads

        rows = read_rows(FULL_DEV, with_candidates=False)
        catalog = [a.ad_id for a in read_ads(ADS)]
        first = outside_fusion_fit()

        def draw_users(n: int, seed: int, offset: int = 0) -> list:
            return sampled_users(rows, catalog=catalog, n=n, seed=seed, offset=offset, first=first,
                                 n_random=args.n_random, candidate_seed=args.candidate_seed)  # fmt: skip

        extra["users_from"] = {"file": "impressions_full_dev.jsonl", "outside_fusion_fit": len(first & {r["user_id"] for r in rows}),
                               "n_random": args.n_random, "candidate_seed": args.candidate_seed}  # fmt: skip
    else:
        rows = read_rows(DEV)

        def draw_users(n: int, seed: int, offset: int = 0) -> list:
            return load_users(rows, n=n, seed=seed, offset=offset)

    tables = BehaviourTables.from_rows(rows)
    runs: list[SimResult] = []
    t0 = time.perf_counter()
    proc = None
    work = Path(tempfile.mkdtemp(prefix="bench_ope_"))
    if args.service == "http":
        from eval.ope_http import HttpService, ServiceProcess

        data, collection = games_data_dir(args.games_data_dir, work)
        arms = http_arms(work, temperature=args.temperature, top_m=args.top_m)
        env = {"ADSELECT_COLLECTION": collection}
        proc = ServiceProcess(data, work / "service", env=env).start()
        print(f"adselect serve on {proc.base_url} over {data} (collection {collection}); log {proc.log_dir}")
    for seed in range(args.seeds):
        if args.users_from == "full":  # the simulated users first (those outside the fusion fit), then the fit users
            users = draw_users(args.users, seed)
            fit = draw_users(args.fit_users, seed, offset=args.users)
        else:
            fit = draw_users(args.fit_users, seed)
            users = draw_users(args.users, seed, offset=args.fit_users)
        if seed == 0:
            outside = len(first & {u.user_id for u in users}) if args.users_from == "full" else None
            extra.setdefault("users_from", {"file": "impressions_sampled_dev.jsonl"})["simulated_users_outside_fusion_fit"] = outside
            print(f"{len(users)} distinct simulated users ({len({u.user_id for u in users})} ids) from {extra['users_from']['file']}"
                  + (f", {outside} of them outside the fusion's fit" if outside is not None else ""))  # fmt: skip
        direct = DirectModel.fit(fit, tables)
        with tempfile.TemporaryDirectory() as tmp:
            if proc is not None:
                service = HttpService(proc, arms=arms)
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
          f"clip={args.clip}: seeds whose 95% CI holds the on-policy CTR / seeds / mean |error| / mean CI width")  # fmt: skip
    for name, row in summary.items():
        cells = "  ".join(
            f"{e} {row[e]['seeds_covered']}/{row[e]['seeds']}/{row[e]['mean_abs_error']:.4f}/{row[e]['mean_ci_width']:.4f}" for e in ESTIMATORS if e in row
        )
        print(f"  {name:11s} {cells}  mean ESS {row['mean_ess']:.0f}")

    def write_report() -> None:  # written before the latency runs and again after them: a failed start loses nothing
        args.out.mkdir(parents=True, exist_ok=True)
        report = {
            "variants": runs[0].variants,
            "seeds": [r.to_json() for r in runs],
            "summary": summary,
            **extra,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        (args.out / "ope_sim.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out / 'ope_sim.json'}")

    if proc is not None:
        from eval.calibration import calibration_line
        from eval.log_calibration import refit_calibration
        from eval.ope_run import joined_records
        from selection.fusion import FusionModel
        from selection.services import weights_version

        # every decision served with the shipped weights (the logging arm and the on-policy `default` arm, all
        # seeds, clicks reported for both), users split by keyed hash: --cal-holdout of them judge the refit
        served_weights = FusionModel.load(None)  # what the bench's data dir serves: the shipped weights
        logged, _ = joined_records(proc.log_dir, proc.feedback_path)
        refits = {"calibration_refit": args.cal_arm}
        if args.cal_arm is None:  # also the logging arm alone (its served ads are drawn by the exploration)
            refits["calibration_refit_logging_arm"] = LOGGING_ARM
        for key, arm in refits.items():
            _, cal = refit_calibration(logged, served_weights, weights_version=weights_version(served_weights),
                                       holdout=args.cal_holdout, method=args.cal_method, bins=args.cal_bins, arm=arm)  # fmt: skip
            extra[key] = cal
            print(f"{key} (arm {arm or 'every arm with the shipped weights'}): {cal['method']} (cross-validated log loss {cal['cv_logloss']}), "
                  f"split {cal['split']}, block {cal['calibration']}, monotone in a list: {cal['monotone_in_list']}")  # fmt: skip
            for part in ("holdout_before", "holdout_after", "cross_fitted"):
                print(f"  {part}: {calibration_line(cal[part])}")
            for a, c in (cal.get("holdout_after_by_arm") or {}).items():
                print(f"  holdout_after, arm {a}: {calibration_line(c)}")
        cal = extra["calibration_refit"]
        args.out.mkdir(parents=True, exist_ok=True)
        from eval.log_calibration import reliability_plot

        print(f"reliability plot: {reliability_plot(cal, args.out / 'reliability.png')}")
        write_report()
        lat_users = draw_users(args.latency, 10_000)
        HttpService(proc, arms=arms).use_arm("default")
        on = latency(proc, lat_users, args.latency)
        written = sum(1 for _ in iter_log_records(proc.log_dir))
        proc.stop()
        try:
            off_proc = ServiceProcess(data, work / "service_nolog", env={**env, "ADSELECT_IMPRESSION_LOG_ENABLED": "false"}).start()
        except RuntimeError as e:  # a loaded machine can miss the start-up deadline: the figures above stand
            extra["log_write_cost"] = {"log_on": on, "error": str(e)}
            print(f"write cost not measured: the log-off service did not start ({e})")
            write_report()
            return
        off = latency(off_proc, lat_users, args.latency)
        off_proc.stop()
        extra["log_write_cost"] = {"log_on": on, "log_off": off, "records_written": written,
                                   "added_p50_ms": on["p50_ms"] - off["p50_ms"], "added_p99_ms": on["p99_ms"] - off["p99_ms"]}  # fmt: skip
        print(f"write cost: p50 {on['p50_ms']:.2f} vs {off['p50_ms']:.2f} ms, p99 {on['p99_ms']:.2f} vs {off['p99_ms']:.2f} ms "
              f"(log on vs off, {args.latency} requests each, one run)")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.1f}s")
    write_report()


if __name__ == "__main__":
    main()
