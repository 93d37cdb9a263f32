"""`adselect eval tune`: fit the fusion weights on a dev impression file and write the weights file.

Built on eval/tune.py (build_training_set, fit_fusion, fit_llm_weight) over the same environment the
eval harness uses (catalog in Chroma, behaviour learned from training histories). The users of
`exclude` (the impressions a report will evaluate: files, or eval tasks' impressions with their
`limit`) are never fitted on. A `calibration_share` of the remaining users (by keyed hash) is kept
apart for the pCTR calibration, which is prior-corrected for the negative sampling (see fit_tune_calibration). The weights' `meta` records the command, the training and exclusion
files with their sha256 and how many training lines were read, so an eval report can state whether
its users were kept out, and anyone can reproduce the file.

The LLM's weights: listwise `llm_coef` from an eval run's LLM results (`--llm-run`, meta.llm_fit);
scoring mode's `llm_score_coef` by scoring training impressions with the service's scorer
(`--llm-mode score`, eval/tune_score.py, meta.llm_score_fit) against ADSELECT_LLM_URL or, unset, the
bundled llama.cpp server started for the fit. Both go through eval.tune.fit_llm_term and the same
gate: the position-controlled fit's weight, 0 unless its interval is above 0, then the injection test.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernel.settings import Settings
from eval.data import load_impressions
from eval.env import prepare_env
from eval.injection_gate import InjectionCheck, run_injection_check
from eval.provenance import exclusion_sources, excluded_users, file_ref, file_sha256, rel_path
from eval.calibration import CALIBRATION_SHARE, apply_calibration, choose_method, fit_calibration, negative_rate_for_base_rate, summary, user_share
from eval.tune import OBJECTIVES, TrainingSet, build_training_set, fit_fusion, fit_llm_weight
from kernel.errors import UserError
from retrieval.features import build_profile
from retrieval.records import iter_impressions
from selection.fusion import list_context

log = logging.getLogger(__name__)


@dataclass
class TuneOptions:
    ads: Path
    impressions: Path
    out: Path
    exclude: list[Path] = field(default_factory=list)
    exclude_tasks: list[str] = field(default_factory=list)  # eval task names/paths: their impressions (+ limit)
    train_histories: list[Path] | None = None  # behaviour source; default: the impressions file
    n_random: int = 19
    n_hard: int = 0
    max_impressions: int | None = 20000
    seed: int = 0
    C: float = 1.0
    interactions: bool = True
    objective: str = "logistic"  # fusion fit: logistic (pointwise) or softmax (listwise per impression), eval.tune.OBJECTIVES
    llm_run: Path | None = None  # an eval DIR whose LLM results (on training users) fit the LLM weight
    injection_check: bool = True  # a positive LLM weight ships only if the injection test passes at it
    calibration_share: float = CALIBRATION_SHARE  # tuning users (by keyed hash) kept for the calibration only
    calibration_method: str = "auto"  # auto (by cross-validated log loss), platt, isotonic
    negative_rate: float | None = None  # kept-negative share r of the prior correction (default: counted from the rows)
    base_rate: float | None = None  # or: the true click rate of a row; r = odds(base_rate) / odds(sampled rate)
    llm_mode: str = "listwise"  # "score": also fit llm_score_coef by scoring training impressions (eval/tune_score.py)
    llm_impressions: int = 200  # scoring mode: training impressions scored for the fit
    llm_url: str | None = None  # scoring mode: the server (default settings.llm_url; unset: the bundled one)
    llm_timeout_s: float = 300.0  # scoring mode: per impression (the bundled CPU server answers P calls in turn)

    def command(self) -> str:
        parts = ["adselect", "eval", "tune", "--ads", rel_path(self.ads), "--impressions", rel_path(self.impressions)]
        for p in self.exclude:
            parts += ["--exclude", rel_path(p)]
        for t in self.exclude_tasks:
            parts += ["--exclude-task", t]
        for h in self.train_histories or []:
            parts += ["--train", rel_path(h)]
        parts += ["--n-random", str(self.n_random), "--n-hard", str(self.n_hard)]
        if self.max_impressions is not None:
            parts += ["--max-impressions", str(self.max_impressions)]
        parts += ["--seed", str(self.seed), "--C", str(self.C)]
        if not self.interactions:
            parts.append("--no-interactions")
        if self.objective != "logistic":
            parts += ["--objective", self.objective]
        if self.llm_run is not None:
            parts += ["--llm-run", rel_path(self.llm_run)]
        if self.llm_mode != "listwise":
            parts += ["--llm-mode", self.llm_mode, "--llm-impressions", str(self.llm_impressions)]
        if (self.llm_run is not None or self.llm_mode != "listwise") and not self.injection_check:
            parts.append("--no-injection-check")
        parts += ["--calibration-share", str(self.calibration_share), "--calibration-method", self.calibration_method]
        if self.negative_rate is not None:
            parts += ["--negative-rate", str(self.negative_rate)]
        if self.base_rate is not None:
            parts += ["--base-rate", str(self.base_rate)]
        parts += ["--out", rel_path(self.out)]
        return shlex.join(parts)


@dataclass
class LLMRows:
    """An eval run's LLM results as fitting rows: the candidates sent to the LLM, re-scored by the model."""

    prior: np.ndarray  # prior score per row
    ranks: list[int | None]  # the LLM's rank of the row's candidate (None = not ranked)
    y: np.ndarray  # clicked 1/0
    groups: np.ndarray  # impression number per row
    sent_ranks: list[int]  # position in the list the LLM was shown (the prior order)
    impressions: int


def _llm_rows(env, model, llm_run: Path, exclude_users: set[str]) -> LLMRows:
    """The rows of an eval run's LLM results (users in `exclude_users` left out), re-scored by `model`."""
    run = json.loads((llm_run / "run.json").read_text())
    from eval.config import resolve_path

    imp_path = resolve_path(Path(run["task"]["data"]["impressions"]))
    index = env.services.index
    by_id = {i.impression_id: i for i in load_impressions(imp_path, catalog=index.row).items}
    priors, ranks, ys, groups, sent_ranks = [], [], [], [], []
    n = 0
    with (llm_run / "results.jsonl").open() as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("phase") != "llm" or not rec.get("llm_ranking"):
                continue
            imp = by_id.get(rec["impression_id"])
            if imp is None or imp.user_id in exclude_users:
                continue
            rows, _ = index.rows(rec["sent"])
            hist, _ = index.rows(imp.history)
            profile = build_profile(index, hist, decay=env.services.selector.recency_decay)
            feats = env.services.selector.generator.score_logged(profile, rows).features
            rank_of = {a: r for r, a in enumerate(rec["llm_ranking"])}
            priors.append(model.prior_scores(feats))
            ranks.extend(rank_of.get(a) for a in rec["sent"])
            ys.append(np.array([1.0 if a in imp.clicked else 0.0 for a in rec["sent"]]))
            groups.append(np.full(len(rec["sent"]), n))
            sent_ranks.extend(range(len(rec["sent"])))
            n += 1
    if not priors:
        raise ValueError(f"{llm_run}: no LLM results of non-excluded users to fit the LLM weight on")
    return LLMRows(np.concatenate(priors), ranks, np.concatenate(ys), np.concatenate(groups), sent_ranks, n)


FIT_META = {"llm_coef": "llm_fit", "llm_score_coef": "llm_score_fit"}  # each LLM weight and its fit's record in meta


def gate_positive_weight(
    model, weight: float, *, opts: TuneOptions, check: Callable[[Path], InjectionCheck] | None, term: str = "llm_coef"
) -> float:
    """The weight that may be written as `term` (llm_coef, llm_score_coef): `weight` if it is 0, or if the
    injection test passes at it; else 0.

    The decision and the check are recorded in `meta.<fit>.shipped` / `meta.<fit>.injection_check` (FIT_META)."""
    fit = model.meta[FIT_META[term]]
    shipped = fit["shipped"]
    if weight <= 0.0:
        fit["injection_check"] = None
        return 0.0
    if not opts.injection_check:
        shipped.update(weight=0.0, reason=f"injection_check_not_run: the fitted {weight:.4g} needs a passing injection test (--injection-check)")
        fit["injection_check"] = {"passed": None, "detail": "not run (--no-injection-check)"}
        return 0.0
    candidate = opts.out.with_name(opts.out.name + ".candidate.json")
    setattr(model, term, weight)
    model.save(candidate)
    try:
        res = (check or (lambda p: run_injection_check(p, weights_sha256=file_sha256(p))))(candidate)
    finally:
        candidate.unlink(missing_ok=True)
        setattr(model, term, 0.0)  # set again by the caller from what this returns
    fit["injection_check"] = {**res.to_dict(), term: weight}
    if not res.passed:
        shipped.update(weight=0.0, reason=f"injection_check_failed: the injection test did not pass at {term} {weight:.4g}")
        log.warning("positive LLM weight refused: injection check failed", extra={term: weight})
        return 0.0
    shipped["reason"] += "; the injection test passed at this weight"
    return weight


def split_for_calibration(ts: TrainingSet, *, share: float) -> tuple[TrainingSet, TrainingSet, dict[str, Any]]:
    """(fusion rows, calibration rows, the split's record): users whose keyed hash (eval.calibration.user_share)
    is below `share` are kept for the calibration, so it is fitted on users the fusion never saw."""
    if not 0.0 < share < 1.0:
        raise UserError(f"--calibration-share must be in (0, 1), got {share}")
    cal = np.array([user_share(u) < share for u in ts.users])
    if cal.all() or not cal.any():
        raise UserError(f"too few training users to keep a share of {share} for the calibration")
    fusion_ts, cal_ts = ts.subset(~cal), ts.subset(cal)
    record = {
        "by": "keyed user hash (eval.calibration.user_share)",
        "calibration_share": share,
        "fusion_users": len(set(fusion_ts.users)),
        "calibration_users": len(set(cal_ts.users)),
        "fusion_impressions": fusion_ts.n_impressions,
        "calibration_impressions": cal_ts.n_impressions,
    }
    return fusion_ts, cal_ts, record


def fit_tune_calibration(model, cal_ts: TrainingSet, *, opts: TuneOptions) -> tuple[dict, dict[str, Any]]:
    """The calibration block for `model` fitted on `cal_ts` (users the fusion did not see), prior-corrected for
    the negative sampling, and its record (method choice, r and where it came from, the in-sample fit)."""
    scores = model.prior_scores(cal_ts.X)
    context = list_context(scores, groups=cal_ts.group)  # each row's place among its impression's candidates (platt_list)
    if opts.negative_rate is not None and opts.base_rate is not None:
        raise UserError("give --negative-rate or --base-rate, not both")
    if opts.negative_rate is not None:
        r, source = opts.negative_rate, "--negative-rate"
    elif opts.base_rate is not None:
        r, source = negative_rate_for_base_rate(float(cal_ts.y.mean()), opts.base_rate), "--base-rate (odds ratio to the rows' rate)"
    else:
        r, source = cal_ts.negative_rate(), "counted: negatives in the rows / negatives they were drawn from"
    method, cv = opts.calibration_method, None
    if method == "auto":
        method, cv = choose_method(scores, cal_ts.y, [cal_ts.users[g] for g in cal_ts.group], context=context)
    try:
        cal = fit_calibration(scores, cal_ts.y, method=method, negative_rate=r, context=context)
    except ValueError as e:
        raise UserError(str(e)) from e
    uncorrected = fit_calibration(scores, cal_ts.y, method=method, context=context)
    record = {
        "method": method,
        "cv_logloss": cv,
        "rows": int(len(cal_ts.y)),
        "negative_rate": r,
        "negative_rate_source": source,
        "log_odds_offset": float(np.log(r)),
        "correction": "prior correction (King & Zeng 2001): logit p = logit p_sampled + log(r)",
        "hard_negatives_note": "n_hard > 0: hard negatives are not a uniform sample; r counts them as drawn from the same pool" if opts.n_hard else None,
        # in-sample on the sampled rows, before the correction (after it, Σp/Σy on sampled rows is r-shrunk by design)
        "sampled_rows_fit": {k: v for k, v in summary(apply_calibration(uncorrected, scores, context=context), cal_ts.y).items() if k != "reliability"},
    }
    return {k: v for k, v in cal.items() if k in ("method", "a", "b", "x", "p", "w", "prior_correction")}, record


def run_tune(
    opts: TuneOptions,
    *,
    settings: Settings,
    show_progress: bool = True,
    injection_check: Callable[[Path], InjectionCheck] | None = None,
    backend=None,
) -> dict[str, Any]:
    """Fit and write the weights. `injection_check(candidate_weights_path)` replaces the real injection test
    (eval.injection_gate.run_injection_check) that a positive LLM weight must pass. `backend`
    (eval.distributed.RayBackend) computes the feature rows on Ray actors; the fit stays here."""
    t0 = time.perf_counter()
    if opts.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {opts.objective!r}")
    train_hist = opts.train_histories or [opts.impressions]
    env = prepare_env(
        settings, ads_path=opts.ads, train_paths=train_hist, show_progress=show_progress,
        count_behaviour=backend.behaviour_counter() if backend is not None else None,
    )  # fmt: skip
    sources = exclusion_sources(files=opts.exclude, tasks=opts.exclude_tasks)
    exclude_users = excluded_users(sources)
    many = {}
    if backend is not None:  # its actors build the same environment (reused from the data dir) once each
        many = backend.tune_featurizer(settings=settings, env_args={"ads_path": opts.ads, "train_paths": train_hist}, n_hard=opts.n_hard)
    ts = build_training_set(
        (rec for _, rec in iter_impressions(opts.impressions)),
        generator=env.services.selector.generator,
        recency_decay=env.services.selector.recency_decay,
        n_random=opts.n_random,
        n_hard=opts.n_hard,
        exclude_users=exclude_users,
        max_impressions=opts.max_impressions,
        seed=opts.seed,
        **many,
    )
    meta = {
        "command": opts.command(),
        "train_file": file_ref(opts.impressions),
        "exclude": sources,
        "excluded_users": len(exclude_users),
        "behaviour_histories": [file_ref(p) for p in train_hist],
        "ads": file_ref(opts.ads),
        "catalog_hash": env.catalog_hash,
        "n_random": opts.n_random,
        "n_hard": opts.n_hard,
        "max_impressions": opts.max_impressions,
        "seed": opts.seed,
    }
    # build_training_set pulls one record past the last one it uses: fitted users ⊆ these lines' users.
    meta["train_lines_read"] = ts.lines_read
    fusion_ts, cal_ts, split = split_for_calibration(ts, share=opts.calibration_share)
    model = fit_fusion(fusion_ts, interactions=opts.interactions, C=opts.C, objective=opts.objective, meta={**meta, "calibration_split": split})
    model.meta.update(train_impressions=ts.n_impressions, train_rows=int(len(ts.y)))  # fusion + calibration users
    model.calibration, model.meta["calibration_fit"] = fit_tune_calibration(model, cal_ts, opts=opts)
    if opts.llm_run is not None:
        rows = _llm_rows(env, model, opts.llm_run, exclude_users)
        weight, info = fit_llm_weight(
            rows.prior, rows.ranks, rows.y, C=opts.C, groups=rows.groups, sent_ranks=rows.sent_ranks, seed=opts.seed
        )
        model.meta["llm_fit"] = {**info, "impressions": rows.impressions, "run": rel_path(opts.llm_run)}
        model.llm_coef = gate_positive_weight(model, weight, opts=opts, check=injection_check)
    else:
        model.meta["llm_fit"] = None
        model.llm_coef = 0.0
        model.meta["llm_coef_note"] = "no LLM ranks on training users were given (--llm-run): the LLM term has weight 0"
    if opts.llm_mode == "score":
        fit_score_weight(model, env, opts=opts, settings=settings, exclude_users=exclude_users, check=injection_check, show_progress=show_progress)
    elif opts.llm_mode != "listwise":
        raise UserError(f"--llm-mode {opts.llm_mode!r}: listwise or score")
    model.meta["fitted_s"] = round(time.perf_counter() - t0, 1)
    model.save(opts.out)
    log.info("fusion weights written", extra={"path": str(opts.out), "train_impressions": ts.n_impressions})
    return {"path": str(opts.out), "train_impressions": ts.n_impressions, "rows": int(len(ts.y)), "skipped": ts.skipped, "meta": model.meta}


def fit_score_weight(
    model, env, *, opts: TuneOptions, settings: Settings, exclude_users: set[str], check, show_progress: bool = False
) -> None:
    """Scoring mode's `llm_score_coef` (eval/tune_score.py rows → fit_llm_term → the injection gate), recorded
    in `meta.llm_score_fit`. The scorer is the service's (selection.services.make_scorer) over opts.llm_url,
    else settings.llm_url, else the bundled llama.cpp server, started here and stopped after the fit."""
    import contextlib
    from dataclasses import replace

    from tqdm import tqdm

    from eval.tune import fit_llm_term
    from eval.tune_score import score_rows
    from selection.services import make_scorer

    url = opts.llm_url or settings.llm_url
    bundled = not url
    s = settings.model_copy(update={"llm_timeout_s": opts.llm_timeout_s})
    with contextlib.ExitStack() as stack:
        if bundled:
            from agent.local_server import LocalLLMServer, free_port

            url = stack.enter_context(LocalLLMServer.from_settings(s, port=free_port())).base_url
        served_by = "bundled llama.cpp server (started for the fit)" if bundled else url
        scorer = make_scorer(s, llm_url=url)
        n = min(s.llm_candidates(bundled_model=bundled), scorer.max_candidates)  # what serving sends (kernel.settings)
        selector = replace(env.services.selector, fusion=model)
        bar = tqdm(total=opts.llm_impressions, desc="tune scoring-mode rows", unit="imp", disable=not show_progress)

        async def rows_then_close():
            try:
                return await score_rows(
                    (rec for _, rec in iter_impressions(opts.impressions)), selector=selector, scorer=scorer, n_candidates=n,
                    max_impressions=opts.llm_impressions, exclude_users=exclude_users, timeout_s=opts.llm_timeout_s, progress=bar,
                )  # fmt: skip
            finally:
                await scorer.llm.aclose()  # the HTTP client of this loop, before the loop ends

        try:
            rows = asyncio.run(rows_then_close())
        finally:
            bar.close()
    if rows.impressions == 0 or rows.y.min() == rows.y.max():
        raise UserError(f"--llm-mode score: no scored impressions with both a click and a non-click to fit on ({rows.record})")
    weight, info = fit_llm_term(
        rows.prior, rows.logprob, rows.y, C=opts.C, groups=rows.groups, position=rows.position, seed=opts.seed
    )
    model.meta["llm_score_fit"] = {
        **info,
        "impressions": rows.impressions,
        "scored": rows.record,
        "served_by": served_by,
        "note": "the injection test's compromised-model cases are listwise; a hijacked scorer lifts an ad by at most "
        "llm_score_coef x (0 - the lowest label log-probability of the impression)",
    }
    model.llm_score_coef = gate_positive_weight(model, weight, opts=opts, check=check, term="llm_score_coef")
