"""`adselect eval …`: run an eval task, validate task files, list them, fit fusion weights, import data.

    adselect eval run --ads A --impressions I [--train T] [--systems a,b] [--no-llm] [--llm-sample N]
                      [--limit N] [--config FILE] [--resume] --out DIR
    adselect eval validate FILE...
    adselect eval tasks
    adselect eval tune --ads A --impressions TRAIN [--exclude EVAL | --exclude-task TASK] [--n-random 19] [--n-hard N] --out W
    adselect eval sample-logged --ads A --impressions FULL [--exclude EVAL | --exclude-task TASK] [--skip N] --n 40 --out F
    adselect eval import-mind --behaviors B.tsv --news N.tsv --out DIR [--max-impressions N]
    adselect eval ope --log DIR --feedback PATH --target NAME=SPEC... [--k 1] [--reward click] [--clip C] --out DIR
    adselect eval import-log --log DIR --feedback PATH --out FILE.jsonl   (then: eval run --impressions FILE.jsonl)
    adselect eval calibrate --log DIR --feedback PATH --weights W --out W2 [--holdout 0.3] [--report R.json]
    adselect eval export-sft --ads A (--impressions I | --log DIR --feedback PATH) [--mode listwise|score] --out DIR

The old form `adselect eval --config … --out …` (options straight after `eval`) still runs, as
`adselect eval run …`, with a deprecation warning on stderr; it goes away in the next release.

Exit status: 0 done; 1 a runtime error (a service, the file system), or `validate` found problems; 2 a
usage error (bad options, an invalid task or data file, an unknown name, a refused resume, inputs the
command cannot use). Messages go to stderr.
Thin: parses options into a task (the YAML file + overrides) and calls eval.harness / eval.tune_run.
Heavy imports happen inside the commands so `adselect --help` stays fast.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from eval.calibration import CALIBRATION_SHARE, ECE_BINS, HOLDOUT_SHARE, calibration_line
from kernel.errors import AdSelectError, UserError

DEPRECATED_FORM = (
    "warning: `adselect eval --option …` is deprecated and will be removed in the next release; "
    "use `adselect eval run --option …`"
)


RAY_LOCAL = "local"  # `--ray` without an address: a local Ray for the command (eval.distributed.cluster)
RAY_HELP = "Run on Ray: alone, a local Ray (2 CPUs); `auto` or an address (host:port, ray://host:10001) joins a cluster."


def ray_flag_default(args: list[str]) -> list[str]:
    """`--ray` given without a value (last, or before another option) becomes `--ray local`: Click has no
    optional option values."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, RAY_LOCAL)
    return out


class EvalGroup(TyperGroup):
    """`adselect eval --config …` (the form before `eval run`) is run as `adselect eval run --config …`, with a warning."""

    def parse_args(self, ctx, args):
        args = ray_flag_default(args)
        if args and args[0].startswith("-") and args[0] not in ("--help", "-h"):
            typer.echo(DEPRECATED_FORM, err=True)
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=EvalGroup, add_completion=False, no_args_is_help=True, help="Offline evaluation against logged impressions (see eval/tasks/)."
)


def _settings(data_dir: Optional[Path]):
    from kernel.settings import Settings

    s = Settings()
    return s.model_copy(update={"data_dir": data_dir}) if data_dir is not None else s


def exit_code(e: Exception) -> int:
    """2 for what the caller got wrong (options, task or data files, names, a refused resume, inputs a
    command cannot use: ValueError), 1 for runtime errors (services, the file system, faults)."""
    return 2 if isinstance(e, (UserError, ValueError)) else 1


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=exit_code(e))


def _overrides(**given: Any) -> dict[str, Any]:
    """Only the options actually given, as a partial task document."""
    doc: dict[str, Any] = {}
    data = {k: given[k] for k in ("ads", "impressions", "limit") if given.get(k) is not None}
    if given.get("train"):
        data["train"] = [str(p) for p in given["train"]]
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
    if data:
        doc["data"] = data
    if given.get("systems"):
        doc["systems"] = [s.strip() for s in given["systems"].split(",") if s.strip()]
    if given.get("no_llm"):
        doc["no_llm"] = True
    llm = {}
    if given.get("llm_sample") is not None:
        llm["sample"] = given["llm_sample"]
    if given.get("llm_url"):
        llm["url"] = given["llm_url"]
    if given.get("concurrency") is not None:
        llm["concurrency"] = given["concurrency"]
    for key in ("rewrite", "position_bias"):
        if given.get(key) is not None:
            llm[key] = given[key]
    if llm:
        doc["llm"] = llm
    if given.get("weights") is not None:
        doc["fusion"] = {"weights": str(given["weights"])}
    return doc


@app.command("run")
def run(
    ctx: typer.Context,
    ads: Optional[Path] = typer.Option(None, "--ads", help="Ad catalog (canonical ads.jsonl)."),
    impressions: Optional[Path] = typer.Option(None, "--impressions", help="Logged impressions to evaluate."),
    train: Optional[list[Path]] = typer.Option(None, "--train", help="Impressions whose histories teach behaviour (repeatable; default: --impressions)."),
    systems: Optional[str] = typer.Option(None, "--systems", help="Comma-separated: random,popularity,bm25,dense,covisit,default,llm,default+llm."),
    no_llm: bool = typer.Option(False, "--no-llm", help="Skip the LLM systems."),
    llm_sample: Optional[int] = typer.Option(None, "--llm-sample", help="Run the LLM systems on N impressions (fixed seed)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N impressions of the file."),
    config: Optional[str] = typer.Option(None, "--config", help="Task YAML (path or name under eval/tasks/); options override it."),
    out: Path = typer.Option(..., "--out", help="Output directory (report.json, report.md, plots, results.jsonl)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    llm_url: Optional[str] = typer.Option(None, "--llm-url", help="OpenAI-compatible base URL; default: start the bundled local model."),
    llm_cache: Optional[Path] = typer.Option(None, "--llm-cache", help="LLM cache SQLite file (default: DATA_DIR/eval/llm_cache.sqlite)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="LLM calls in flight."),
    rewrite: Optional[bool] = typer.Option(
        None, "--rewrite/--no-rewrite", help="LLM systems: also ask for copy (llm.rewrite); the report counts what was served and why not."
    ),
    position_bias: Optional[bool] = typer.Option(
        None, "--position-bias/--no-position-bias", help="LLM systems: the reversed/shuffled re-asks (llm.position_bias; 2 extra calls each)."
    ),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Fusion weights JSON."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Overrides ADSELECT_DATA_DIR."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    llm_urls: Optional[str] = typer.Option(None, "--llm-urls", help="With --ray: comma-separated OpenAI-compatible base URLs the LLM actors share (ADSELECT_LLM_URLS)."),
) -> None:
    """Replay logged impressions through the pipeline and the baselines; write DIR/report.{json,md} and plots."""
    import logging

    from eval.config import find_task_file, load_task, task_from_document
    from eval.harness import run_eval

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs index building at DEBUG whatever the root level

    overrides = _overrides(
        ads=ads, impressions=impressions, train=train, systems=systems, no_llm=no_llm, llm_sample=llm_sample,
        limit=limit, llm_url=llm_url, concurrency=concurrency, weights=weights, rewrite=rewrite, position_bias=position_bias,
    )  # fmt: skip
    try:
        config_file = find_task_file(config) if config else None
        task = load_task(config_file, overrides=overrides) if config_file else task_from_document(overrides, where="<options>")
        settings = _settings(data_dir)
        if llm_urls:
            settings = settings.model_copy(update={"llm_urls": [u.strip() for u in llm_urls.split(",") if u.strip()]})
        with _ray(ray) as backend:
            report = run_eval(
                task, settings=settings, out_dir=out, resume=resume, show_progress=progress, config_file=config_file,
                llm_cache_path=llm_cache, backend=backend(settings) if backend else None,
            )  # fmt: skip
    except (AdSelectError, OSError) as e:
        _fail(e)
    _summary(report, out)


@contextlib.contextmanager
def _ray(address: Optional[str]):
    """No --ray: None. --ray [ADDRESS]: a Ray session for the command, yielding RayBackend.from_settings."""
    if address is None:
        yield None
        return
    from eval.distributed import RayBackend, ray_session

    with ray_session(address):
        yield RayBackend.from_settings


def _summary(report: dict, out: Path) -> None:
    keys = [m for m in ("auc", "mrr", "ndcg@5", "ndcg@10", "hit@10", "recall@50") if m in report["metric_names"]]
    typer.echo(f"{report['n_impressions']} impressions (skipped: {sum(report['skipped'].values())})")
    typer.echo(f"{'system':<13}{'n':>7} " + " ".join(f"{k:>9}" for k in keys))
    for s, m in report["metrics"].items():
        cells = " ".join(f"{m[k]:9.4f}" if m.get(k) is not None else f"{'—':>9}" for k in keys)
        typer.echo(f"{s:<13}{report['n'].get(s, 0):>7} {cells}")
    cs = report.get("candidate_stage")
    if cs:
        typer.echo("candidate stage: " + ", ".join(f"{k} {cs[k]:.4f}" for k in cs if k.startswith("recall@") and not k.endswith("_ci")))
    fast = report["speed"].get("fast", {})
    typer.echo(f"fast path: {fast.get('impressions_per_s')} impressions/s")
    if report.get("llm"):
        typer.echo(f"llm: {report['speed'].get('llm')} cache {report['llm']['cache']}")
    for system, c in (report.get("calibration") or {}).items():
        typer.echo(f"calibration {system}: {calibration_line(c)} (base rate {c['base_rate']:.4f}: log loss {c['logloss_base_rate']:.4f})")
    rw = report.get("rewrites")
    if rw:
        typer.echo(f"rewrites: served {rw['served']}/{rw['requested']}, violations {rw['violations'] or 'none'}")
    typer.echo(f"report: {out / 'report.md'}")


@app.command("validate")
def validate(
    files: list[str] = typer.Argument(..., help="Task files (paths or names under eval/tasks/)."),
    data: bool = typer.Option(True, "--data/--no-data", help="Also check that the data files exist."),
) -> None:
    """Check task files (schema, includes, systems, prompt, weights, data paths) without running them."""
    from kernel.settings import Settings
    from eval.config import find_task_file, load_task, validate_task

    bad = 0
    for name in files:
        try:
            path = find_task_file(name)
            task = load_task(path)
            problems = validate_task(task, prompts_dir=Settings().prompts_dir, require_data=data)
        except AdSelectError as e:
            problems = [str(e)]
        if problems:
            bad += 1
            typer.echo(f"{name}: INVALID", err=True)
            for p in problems:
                typer.echo(f"  - {p}", err=True)
        else:
            typer.echo(f"{name}: ok ({task.name}: {len(task.systems)} systems, sha256 {task.sha256()[:12]})")
    if bad:
        raise typer.Exit(code=1)  # the check ran and found problems (as a linter answers)


@app.command("tasks")
def tasks() -> None:
    """List the task files under eval/tasks/."""
    from eval.config import TASKS_DIR, load_task

    for p in sorted(TASKS_DIR.glob("*.yaml")):
        try:
            t = load_task(p)
            typer.echo(f"{p.stem:<24} {t.description.strip().splitlines()[0] if t.description.strip() else ''}")
        except AdSelectError as e:
            typer.echo(f"{p.stem:<24} INVALID: {e}")


@app.command("tune")
def tune(
    ads: Path = typer.Option(..., "--ads", help="Ad catalog."),
    impressions: Path = typer.Option(..., "--impressions", help="Training impressions (clicked + sampled negatives)."),
    out: Path = typer.Option(..., "--out", help="Weights JSON to write."),
    exclude: Optional[list[Path]] = typer.Option(None, "--exclude", help="Impressions to be evaluated: their users are never fitted on (repeatable)."),
    exclude_task: Optional[list[str]] = typer.Option(None, "--exclude-task", help="An eval task whose impressions (with its limit) are excluded likewise (repeatable)."),
    train: Optional[list[Path]] = typer.Option(None, "--train", help="Histories for behaviour (default: --impressions)."),
    n_random: int = typer.Option(19, "--n-random", min=0, help="Random negatives per training impression."),
    n_hard: int = typer.Option(0, "--n-hard", min=0, help="Negatives from our own candidate generator."),
    max_impressions: Optional[int] = typer.Option(20000, "--max-impressions", help="Training impressions used (after exclusion)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the negative sampling and the LLM weight's bootstrap."),
    C: float = typer.Option(1.0, "--C", help="Inverse L2 strength of the logistic fit."),
    interactions: bool = typer.Option(True, "--interactions/--no-interactions", help="Pairwise feature products."),
    objective: str = typer.Option("logistic", "--objective", help="Fusion fit: logistic (each row's click) or softmax (each impression's click against its list)."),
    llm_run: Optional[Path] = typer.Option(None, "--llm-run", help="An eval DIR with LLM results on training users: fits the LLM weight."),
    llm_mode: str = typer.Option("listwise", "--llm-mode", help="score: also fit scoring mode's llm_score_coef by scoring training impressions (ADSELECT_LLM_URL, unset: the bundled server)."),
    llm_impressions: int = typer.Option(200, "--llm-impressions", min=1, help="--llm-mode score: training impressions scored for the fit."),
    injection_check: bool = typer.Option(
        True, "--injection-check/--no-injection-check",
        help="Run the prompt-injection test at a positive fitted LLM weight; the weight ships only if it passes (else 0).",
    ),  # fmt: skip
    calibration_share: float = typer.Option(CALIBRATION_SHARE, "--calibration-share", help="Share of tuning users (by keyed hash) kept apart: the pCTR calibration is fitted on them, the fusion never sees them."),
    calibration_method: str = typer.Option("auto", "--calibration-method", help="auto (platt, isotonic or platt_list, by cross-validated log loss over users), platt, isotonic, platt_list (list-aware: the score and its place among the scored candidates)."),
    negative_rate: Optional[float] = typer.Option(None, "--negative-rate", help="Share r of negatives the rows keep; the calibration's log-odds move by log(r) (default: counted from the sampling)."),
    base_rate: Optional[float] = typer.Option(None, "--base-rate", help="Or: the true click rate of a scored row; r = odds(base rate) / odds(the rows' rate)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Overrides ADSELECT_DATA_DIR."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP + " The feature rows are computed on actors; the same weights come out."),
) -> None:
    """Fit the fusion weights (eval/tune.py) and write the weights file the server and eval load."""
    from eval.tune_run import TuneOptions, run_tune

    opts = TuneOptions(
        ads=ads, impressions=impressions, out=out, exclude=list(exclude or []), exclude_tasks=list(exclude_task or []),
        train_histories=list(train or []) or None,
        n_random=n_random, n_hard=n_hard, max_impressions=max_impressions, seed=seed, C=C,
        interactions=interactions, objective=objective, llm_run=llm_run, injection_check=injection_check,
        llm_mode=llm_mode, llm_impressions=llm_impressions,
        calibration_share=calibration_share, calibration_method=calibration_method, negative_rate=negative_rate, base_rate=base_rate,
    )  # fmt: skip
    try:
        settings = _settings(data_dir)
        with _ray(ray) as backend:
            res = run_tune(opts, settings=settings, backend=backend(settings) if backend else None)
    except (AdSelectError, ValueError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "meta"}))
    fit = res["meta"].get("llm_fit")
    if fit:
        typer.echo(f"llm_coef: {fit['shipped']['weight']} ({fit['shipped']['fit']} fit: {fit['shipped']['reason']})")
    score_fit = res["meta"].get("llm_score_fit")
    if score_fit:
        typer.echo(f"llm_score_coef: {score_fit['shipped']['weight']} ({score_fit['shipped']['fit']} fit: {score_fit['shipped']['reason']})")
    typer.echo(f"command: {res['meta']['command']}")


@app.command("sample-logged")
def sample_logged_cmd(
    ads: Path = typer.Option(..., "--ads", help="Ad catalog (negatives are drawn from it)."),
    impressions: Path = typer.Option(..., "--impressions", help="Full-catalog impressions (candidates: [])."),
    out: Path = typer.Option(..., "--out", help="JSONL to write (keep it out of the repository, e.g. var/); plus <name>.meta.json."),
    exclude: Optional[list[Path]] = typer.Option(None, "--exclude", help="Impressions whose users are never drawn (repeatable)."),
    exclude_task: Optional[list[str]] = typer.Option(None, "--exclude-task", help="An eval task whose impressions (with its limit) are excluded likewise."),
    n: int = typer.Option(40, "--n", min=1, help="Impressions to draw."),
    n_random: int = typer.Option(19, "--n-random", min=1, help="Random catalog negatives per impression."),
    skip: int = typer.Option(0, "--skip", min=0, help="Ignore the first N records (e.g. the weights' meta.train_lines_read)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the user draw and the negatives."),
) -> None:
    """Logged-candidate impressions (clicked + N random ads) for users outside the eval sets (eval/sample_logged.py)."""
    from eval.sample_logged import SampleOptions, sample_logged

    opts = SampleOptions(
        ads=ads, impressions=impressions, out=out, exclude=list(exclude or []), exclude_tasks=list(exclude_task or []),
        n=n, n_random=n_random, skip=skip, seed=seed,
    )  # fmt: skip
    try:
        meta = sample_logged(opts)
    except (AdSelectError, ValueError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps(meta["counts"]))
    typer.echo(f"command: {meta['command']}")


@app.command("import-mind")
def import_mind_cmd(
    behaviors: Path = typer.Option(..., "--behaviors", help="MIND behaviors.tsv (impression id, user, time, history, candidates-clicked)."),
    news: Path = typer.Option(..., "--news", help="MIND news.tsv (the catalog)."),
    out: Path = typer.Option(..., "--out", help="Directory for ads.jsonl and impressions.jsonl (canonical; both replaced atomically)."),
    max_impressions: Optional[int] = typer.Option(None, "--max-impressions", min=1, help="Only the first N rows of behaviors.tsv."),
) -> None:
    """Convert a MIND dataset to the canonical ads.jsonl + impressions.jsonl (eval/importers.py)."""
    from eval.importers import import_mind

    try:
        n_ads, n_imp = import_mind(behaviors, news, out_dir=out, max_impressions=max_impressions)
    except (AdSelectError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps({"ads": n_ads, "impressions": n_imp, "out": str(out)}))


def _target_option(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, spec = v.partition("=")
        if not sep or not name or not spec:
            raise typer.BadParameter(f"{v!r}: use NAME=SPEC (SPEC: logged | feature:<name> | weights.json, optionally @relevance/@expected_value)")
        out[name] = spec
    return out


@app.command("ope")
def ope_cmd(
    log: Path = typer.Option(..., "--log", help="Impression-log directory (data_dir/impressions)."),
    feedback: Path = typer.Option(..., "--feedback", help="Feedback store (data_dir/feedback.sqlite)."),
    target: list[str] = typer.Option(
        ..., "--target", help="NAME=SPEC, repeatable. SPEC: logged | feature:<name> | weights.json, optionally @relevance or @expected_value."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: DIR/report.json."),
    k: int = typer.Option(1, "--k", min=1, help="Positions evaluated (k > 1: cascade IPS / DR over the first k served ads)."),
    reward: str = typer.Option("click", "--reward", help="click (CTR) or revenue (bid × click)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Clip importance weights from above at this value (biased, lower variance)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=10, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    arm: Optional[str] = typer.Option(None, "--arm", help="Only records logged by this arm (default: every record)."),
    rank_by: str = typer.Option("expected_value", "--rank-by", help="Default ordering of weights/logged targets: expected_value or relevance."),
    ads: Optional[Path] = typer.Option(None, "--ads", help="Ad catalog (ads.jsonl): adds each target's exposure by advertiser/category (Gini) and coverage."),
) -> None:
    """Off-policy estimates (IPS, SNIPS, DR with bootstrap CIs, n, ESS) of target variants from the log + feedback."""
    from eval.ope_run import run_ope

    if reward not in ("click", "revenue"):
        _fail(UserError(f"--reward must be click or revenue, not {reward!r}"))
    if rank_by not in ("expected_value", "relevance"):
        _fail(UserError(f"--rank-by must be expected_value or relevance, not {rank_by!r}"))
    targets = _target_option(target)
    try:
        from eval.exposure import read_catalog

        catalog = read_catalog(ads) if ads is not None else None
        report = run_ope(
            log_dir=log, feedback=feedback, targets=targets, k=k, reward=reward, clip=clip,  # type: ignore[arg-type]
            n_bootstrap=bootstrap, seed=seed, arm=arm, default_rank_by=rank_by, catalog=catalog,  # type: ignore[arg-type]
        )  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
    except (AdSelectError, OSError) as e:
        _fail(e)
    for name, r in report["targets"].items():
        cells = "  ".join(f"{e} {r[e]['value']:.4f} [{r[e]['ci'][0]:.4f}, {r[e]['ci'][1]:.4f}]" for e in ("ips", "snips", "dr") if e in r)
        typer.echo(f"{name}: n={r['n']} ess={r['ess']:.0f}  {cells}")
        for w in r.get("warnings", []):
            typer.echo(f"  warning: {w}")
    typer.echo(f"wrote {out / 'report.json'}")


@app.command("import-log")
def import_log_cmd(
    log: Path = typer.Option(..., "--log", help="Impression-log directory (data_dir/impressions)."),
    feedback: Path = typer.Option(..., "--feedback", help="Feedback store (data_dir/feedback.sqlite)."),
    out: Path = typer.Option(..., "--out", help="Canonical impressions JSONL to write (clicked filled from feedback)."),
    arm: Optional[str] = typer.Option(None, "--arm", help="Only records logged by this arm."),
) -> None:
    """The service's own log + feedback as canonical impressions, for `adselect eval run --impressions FILE`."""
    from eval.ope_run import materialise_log

    try:
        counts = materialise_log(log, feedback, out, arm=arm)
    except (AdSelectError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps({**counts, "out": str(out)}))


@app.command("calibrate")
def calibrate_cmd(
    log: Path = typer.Option(..., "--log", help="Impression-log directory (data_dir/impressions)."),
    feedback: Path = typer.Option(..., "--feedback", help="Feedback store (data_dir/feedback.sqlite)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Fusion weights the log was served with (default: the service's)."),
    out: Path = typer.Option(..., "--out", help="Weights JSON to write: the same fusion with the refit calibration."),
    holdout: float = typer.Option(HOLDOUT_SHARE, "--holdout", min=0.05, max=0.95, help="Share of users (by keyed hash) held out to judge the fit."),
    method: str = typer.Option("auto", "--method", help="auto (platt, isotonic or platt_list, by cross-validated log loss over users), platt, isotonic, platt_list (list-aware: the score and its place among the scored candidates)."),
    bins: int = typer.Option(ECE_BINS, "--bins", min=2, help="Equal-count bins of the reliability table and ECE."),
    arm: Optional[str] = typer.Option(None, "--arm", help="Only this arm's records (default: every arm served with these weights)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Calibration report JSON (default: next to --out, .calibration.json; the plot .reliability.png)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Overrides ADSELECT_DATA_DIR (for the default weights)."),
) -> None:
    """Refit pCTR calibration on the log's real feedback; report log loss, NE, sum p / sum y, ECE (with its
    bootstrap interval and noise floor) and the reliability table on held-out users, and a reliability plot."""
    from eval.log_calibration import refit_calibration, reliability_plot
    from eval.ope_run import joined_records
    from selection.fusion import FusionModel
    from selection.services import weights_version

    try:
        fusion = FusionModel.load(weights if weights is not None else _settings(data_dir).resolved_weights_path())
        records, _ = joined_records(log, feedback)
        refit, rep = refit_calibration(records, fusion, weights_version=weights_version(fusion), holdout=holdout, method=method, bins=bins, arm=arm)
        refit.save(out)
        rpath = report or out.with_suffix(".calibration.json")
        rpath.write_text(json.dumps(rep, indent=2))
        plot = reliability_plot(rep, rpath.with_name(rpath.name.removesuffix(".calibration.json").removesuffix(".json") + ".reliability.png"))
    except (AdSelectError, OSError) as e:
        _fail(e)
    typer.echo(f"method {rep['method']} (cross-validated log loss {rep['cv_logloss']}); {bins} quantile bins")
    for part in ("holdout_before", "holdout_after", "cross_fitted"):
        typer.echo(f"{part}: {calibration_line(rep[part])}")
    for a, c in (rep.get("holdout_after_by_arm") or {}).items():
        typer.echo(f"holdout_after, arm {a}: {calibration_line(c)}")
    typer.echo(f"wrote {out}, {rpath} and {plot}")


@app.command("export-sft")
def export_sft_cmd(
    ads: Path = typer.Option(..., "--ads", help="Ad catalog (canonical JSONL), as served."),
    impressions: Optional[Path] = typer.Option(None, "--impressions", help="Logged impressions with clicks (canonical JSONL, e.g. from import-mind)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Or the service's impression-log directory (with --feedback)."),
    feedback: Optional[Path] = typer.Option(None, "--feedback", help="Feedback store for --log (data_dir/feedback.sqlite)."),
    out: Path = typer.Option(..., "--out", help="Directory for train.jsonl, valid.jsonl, manifest.json."),
    mode: str = typer.Option("listwise", "--mode", help="listwise (prompts/rerank.yaml) or score (prompts/score.yaml)."),
    train: list[Path] = typer.Option([], "--train", help="Histories the behaviour priors are learned from (default: the impressions)."),
    valid_share: float = typer.Option(0.1, "--valid-share", min=0.0, max=0.95, help="Share of USERS whose impressions go to valid.jsonl."),
    seed: int = typer.Option(0, "--seed", help="Salt of the user split."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N impressions."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Overrides ADSELECT_DATA_DIR (Chroma, behaviour, weights)."),
) -> None:
    """Chat-format SFT data rendered by the service's own prompt template, the clicked ad as the answer, split by user."""
    from eval.sft_export import export_sft

    if mode not in ("listwise", "score"):
        _fail(UserError(f"--mode must be listwise or score, not {mode!r}"))
    if (impressions is None) == (log is None) or (log is not None and feedback is None):
        _fail(UserError("give --impressions FILE, or --log DIR with --feedback PATH"))
    try:
        if log is not None:
            from eval.ope_run import materialise_log

            impressions = Path(out) / "impressions_from_log.jsonl"
            materialise_log(log, feedback, impressions)
        summary = export_sft(
            settings=_settings(data_dir), ads_path=ads, impressions_path=impressions, out_dir=out, mode=mode,  # type: ignore[arg-type]
            train_paths=list(train), valid_share=valid_share, seed=seed, limit=limit,
        )  # fmt: skip
    except (AdSelectError, OSError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps({k: summary[k] for k in ("mode", "impressions_read", "skipped", "splits")}))
