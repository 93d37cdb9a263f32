"""`adselect eval tune`: fit the fusion weights on a dev impression file and write the weights file.

Built on eval/tune.py (build_training_set, fit_fusion, fit_llm_weight) over the same environment the
eval harness uses (catalog in Chroma, behaviour learned from training histories). The users of
`exclude` (the impressions a report will evaluate: files, or eval tasks' impressions with their
`limit`) are never fitted on. The weights' `meta` records the command, the training and exclusion
files with their sha256 and how many training lines were read, so an eval report can state whether
its users were kept out, and anyone can reproduce the file.
"""
from __future__ import annotations

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
from eval.calibration import fit_calibration, reliability
from eval.tune import build_training_set, fit_fusion, fit_llm_weight
from retrieval.features import build_profile
from retrieval.records import iter_impressions

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
    llm_run: Path | None = None  # an eval DIR whose LLM results (on training users) fit the LLM weight
    injection_check: bool = True  # a positive LLM weight ships only if the injection test passes at it

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
        if self.llm_run is not None:
            parts += ["--llm-run", rel_path(self.llm_run)]
            if not self.injection_check:
                parts.append("--no-injection-check")
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


def gate_positive_weight(model, weight: float, *, opts: TuneOptions, check: Callable[[Path], InjectionCheck] | None) -> float:
    """The weight that may be written: `weight` if it is 0, or if the injection test passes at it; else 0.

    The decision and the check are recorded in `meta.llm_fit.shipped` / `meta.llm_fit.injection_check`."""
    shipped = model.meta["llm_fit"]["shipped"]
    if weight <= 0.0:
        model.meta["llm_fit"]["injection_check"] = None
        return 0.0
    if not opts.injection_check:
        shipped.update(weight=0.0, reason=f"injection_check_not_run: the fitted {weight:.4g} needs a passing injection test (--injection-check)")
        model.meta["llm_fit"]["injection_check"] = {"passed": None, "detail": "not run (--no-injection-check)"}
        return 0.0
    candidate = opts.out.with_name(opts.out.name + ".candidate.json")
    model.llm_coef = weight
    model.save(candidate)
    try:
        res = (check or (lambda p: run_injection_check(p, weights_sha256=file_sha256(p))))(candidate)
    finally:
        candidate.unlink(missing_ok=True)
    model.meta["llm_fit"]["injection_check"] = {**res.to_dict(), "llm_coef": weight}
    if not res.passed:
        shipped.update(weight=0.0, reason=f"injection_check_failed: the injection test did not pass at llm_coef {weight:.4g}")
        log.warning("positive LLM weight refused: injection check failed", extra={"llm_coef": weight})
        return 0.0
    shipped["reason"] += "; the injection test passed at this weight"
    return weight


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
    train_hist = opts.train_histories or [opts.impressions]
    env = prepare_env(settings, ads_path=opts.ads, train_paths=train_hist, show_progress=show_progress)
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
    model = fit_fusion(ts, interactions=opts.interactions, C=opts.C, meta=meta)
    # pCTR for bid × pCTR ordering: Platt scaling of the fused score on the same logged clicks (2 parameters
    # over every training row; strictly monotone, so it never reorders what fusion ranked).
    scores = model.prior_scores(ts.X)
    model.calibration = fit_calibration(scores, ts.y)
    model.meta["calibration_reliability"] = reliability(model.pctr(scores), ts.y)
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
    model.meta["fitted_s"] = round(time.perf_counter() - t0, 1)
    model.save(opts.out)
    log.info("fusion weights written", extra={"path": str(opts.out), "train_impressions": ts.n_impressions})
    return {"path": str(opts.out), "train_impressions": ts.n_impressions, "rows": int(len(ts.y)), "skipped": ts.skipped, "meta": model.meta}
