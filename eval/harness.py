"""`adselect eval`: replay logged impressions through the endpoint's core and write DIR/report.*.

    task (YAML + CLI overrides) ─▶ env (Chroma catalog, train-keyed behaviour, Selector)
        ─▶ fast phase: every impression, every fast system (eval/rankers.py)
        ─▶ LLM phase: the LLM sample, `llm` and `default+llm` (+ position bias) (eval/llm_phase.py)
        ─▶ DIR/results.jsonl (one line per impression and phase, appended as each finishes)
        ─▶ DIR/report.json, DIR/report.md, DIR/*.png

`resume=True` keeps DIR/results.jsonl and runs only what is missing, provided DIR/run.json shows the
same task, data and weights; otherwise a resume is refused.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kernel.errors import UserError
from selection.fusion import FusionModel
from kernel.settings import REPO_ROOT, Settings
from eval.config import EvalTask, TaskError, resolve_path, validate_task
from eval.data import EvalImpression, load_impressions
from eval.env import EvalEnv, file_sha256, prepare_env
from eval.metrics import get_metric, locate
from eval.provenance import dumps, fusion_provenance, fusion_separation, git_state, now_iso, runtime
from eval.report import (
    aggregate,
    calibration,
    candidate_stage,
    llm_summary,
    metric_names,
    position_bias,
    render_markdown,
    rewrite_summary,
)
from eval.systems import FAST_SYSTEMS, LLM_SYSTEMS, resolve_systems

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"


class ResumeMismatch(UserError):
    code = "eval_resume_mismatch"


class ResultsLog:
    """DIR/results.jsonl: one JSON line per (impression, phase), appended as results finish."""

    def __init__(self, path: Path, *, resume: bool):
        self.path = path
        self.done: dict[str, dict[str, dict]] = {"fast": {}, "llm": {}}
        if resume and path.exists():
            self._load()
        elif path.exists():
            path.unlink()
        self._fh = path.open("a", encoding="utf-8")
        self._since_flush = 0

    def _load(self) -> None:
        good_bytes = 0
        with self.path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # a line cut by the interruption: dropped and rewritten
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    break
                self.done.setdefault(rec["phase"], {})[rec["impression_id"]] = rec
                good_bytes += len(raw)
        if good_bytes < self.path.stat().st_size:
            with self.path.open("r+b") as fh:
                fh.truncate(good_bytes)

    def append(self, rec: dict[str, Any], *, flush: bool = False) -> None:
        self.done.setdefault(rec["phase"], {})[rec["impression_id"]] = rec
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._since_flush += 1
        if flush or self._since_flush >= 500:
            self._fh.flush()
            self._since_flush = 0

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="imp", file=sys.stderr, disable=not enabled, smoothing=0.1, mininterval=0.5)


def _metrics_of(names_logged: list[str], names_full: list[str]):
    """Per-impression metrics of each system's ranking (eval.metrics: positions located once per ranking)."""
    logged = [get_metric(n) for n in names_logged]
    full = [get_metric(n) for n in names_full]

    def of(imp: EvalImpression, rankings: dict[str, list[str]], pool_size: int | None) -> dict[str, dict[str, float | None]]:
        metrics = full if imp.candidates is None else logged
        out = {}
        for s, r in rankings.items():
            p = locate(r, imp.clicked, pool_size=pool_size)
            out[s] = {m.name: m.of(p) for m in metrics}
        return out

    return of


def fast_record(imp: EvalImpression, rankers, metrics_of) -> dict[str, Any]:
    res = rankers.run(imp)
    rec: dict[str, Any] = {
        "phase": "fast",
        "impression_id": imp.impression_id,
        "protocol": imp.protocol,
        "metrics": metrics_of(imp, res.rankings, res.pool_size),
    }
    if res.candidate_set_size is not None:
        rec["cand"] = {"size": res.candidate_set_size, "hit": res.candidate_set_hit}
    if res.scores is not None:
        rec["scores"] = {"default": res.scores, "clicked_at": res.clicked_at}
    return rec


def fast_workers(configured: int, n: int) -> int:
    """0 = auto: one process per CPU (at most 4) when there are enough impressions to pay for the fork."""
    if configured:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus) if n >= 2000 else 1


_FORKED: tuple[Any, Any, list[EvalImpression]] | None = None  # (rankers, metrics_of, items): inherited by the workers


def _fast_chunk(bounds: tuple[int, int]) -> list[dict[str, Any]]:
    rankers, metrics_of, items = _FORKED  # type: ignore[misc]
    return [fast_record(imp, rankers, metrics_of) for imp in items[bounds[0] : bounds[1]]]


def _fast_parallel(items: list[EvalImpression], rankers, metrics_of, *, workers: int, chunk: int = 250):
    """Fast records in input order, computed by `workers` forked processes."""
    import multiprocessing as mp

    global _FORKED
    _FORKED = (rankers, metrics_of, items)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            for recs in pool.imap(_fast_chunk, [(i, i + chunk) for i in range(0, len(items), chunk)]):
                yield from recs
    finally:
        _FORKED = None


def llm_sample(items: list[EvalImpression], n: int | None, seed: int) -> list[EvalImpression]:
    if n is None or n >= len(items):
        return list(items)
    pick = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in pick]


def run_eval(
    task: EvalTask,
    *,
    settings: Settings,
    out_dir: Path,
    resume: bool = False,
    show_progress: bool = True,
    config_file: Path | None = None,
    llm_inner=None,
) -> dict[str, Any]:
    """Run one eval task and write DIR/report.json, report.md and plots; returns the report."""
    problems = validate_task(task, prompts_dir=settings.prompts_dir)
    if problems:
        raise TaskError("invalid eval task:\n  " + "\n  ".join(problems))
    systems = resolve_systems(task.systems)
    ads_path = resolve_path(task.data.ads)
    imp_path = resolve_path(task.data.impressions)
    train_paths = [resolve_path(p) for p in task.data.train] or [imp_path]
    weights_path = resolve_path(task.fusion.weights)
    want_llm = [s for s in systems if s in LLM_SYSTEMS]
    run_llm = bool(want_llm) and not task.no_llm
    not_run = {s: "no_llm" for s in want_llm} if not run_llm else {}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_hashes = {
        "ads": {"path": str(task.data.ads), "sha256": file_sha256(ads_path)},
        "impressions": {"path": str(task.data.impressions), "sha256": file_sha256(imp_path)},
        "train": [{"path": str(p), "sha256": file_sha256(resolve_path(p))} for p in task.data.train]
        or [{"path": str(task.data.impressions) + " (the evaluated impressions)", "sha256": None}],
    }
    fingerprint = {
        "task_sha256": task.sha256(),
        "data": data_hashes,
        "weights_sha256": file_sha256(weights_path) if weights_path else None,
    }
    run_file = out_dir / RUN
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ResumeMismatch(f"{out_dir}: cannot resume: the task, data or weights differ from the interrupted run")
    run_file.write_text(dumps({"fingerprint": fingerprint, "task": task.to_jsonable(), "started": now_iso()}))

    if task.llm.max_candidates is None:
        n_llm = settings.llm_candidates(bundled_model=not task.llm.url)
        task = task.model_copy(update={"llm": task.llm.model_copy(update={"max_candidates": n_llm})})
    eval_settings = settings.model_copy(
        update={
            "llm_max_candidates": task.llm.max_candidates,
            "max_deadline_ms": max(settings.max_deadline_ms, int(task.llm.timeout_s * 1000)),
            "llm_model": task.llm.model,
            "llm_enabled": True,
        }
    )
    stack = None
    results = ResultsLog(out_dir / RESULTS, resume=resume)
    try:
        if run_llm:
            from eval.llm_phase import build_llm_stack

            stack = build_llm_stack(
                task.llm, data_dir=settings.data_dir, prompts_dir=settings.prompts_dir, settings=eval_settings, inner=llm_inner
            )
        env = prepare_env(
            eval_settings,
            ads_path=ads_path,
            train_paths=train_paths,
            weights_path=weights_path,
            reranker=stack.reranker if stack else None,
            show_progress=show_progress,
        )
        report = _run(
            task, env, stack=stack, systems=systems, run_llm=run_llm, not_run=not_run, results=results,
            imp_path=imp_path, show_progress=show_progress,
        )  # fmt: skip
    finally:
        results.close()
        if stack is not None:
            stack.close()
    report["provenance"].update(
        {
            "config_file": str(config_file) if config_file else None,
            "config_file_sha256": file_sha256(config_file) if config_file else None,
            "config_sha256": task.sha256(),
            "data": data_hashes,
        }
    )
    _write(report, out_dir)
    return report


def _run(
    task: EvalTask,
    env: EvalEnv,
    *,
    stack,
    systems: list[str],
    run_llm: bool,
    not_run: dict[str, str],
    results: ResultsLog,
    imp_path: Path,
    show_progress: bool,
) -> dict:
    from eval.bm25 import BM25Index
    from eval.rankers import FastRankers

    selector = env.services.selector
    index = env.services.index
    selector.generator.use_chroma = task.protocol.use_chroma
    loaded = load_impressions(imp_path, catalog=index.row, limit=task.data.limit)
    items = loaded.items
    order = [i.impression_id for i in items]
    names = metric_names(task.protocol.recall_ks)
    names_logged = [m for m in names if not m.startswith("recall@")]
    metrics_of = _metrics_of(names_logged, names)
    speed: dict[str, Any] = {}

    # ---- fast phase ---------------------------------------------------------------------------
    fast_systems = [s for s in systems if s in FAST_SYSTEMS]
    t = time.perf_counter()
    bm25 = BM25Index(index.ads) if "bm25" in fast_systems else None
    bm25_s = time.perf_counter() - t
    rankers = FastRankers(
        selector=selector, bm25=bm25, systems=fast_systems,
        n_retrieve=task.protocol.n_retrieve, use_chroma=task.protocol.use_chroma, seed=task.protocol.seed,
    )  # fmt: skip
    todo = [i for i in items if i.impression_id not in results.done["fast"]]
    bar = _progress(len(todo), "eval fast", show_progress)
    # The loaded catalog, behaviour and impressions are long-lived: keep the cyclic GC from rescanning
    # them every few thousand allocations (the per-impression objects are freed by refcount anyway).
    gc.collect()
    gc.freeze()
    t = time.perf_counter()
    # Forked workers share the loaded state copy-on-write; they never query Chroma, so full-catalog
    # impressions stay in this process when dense retrieval goes through Chroma.
    forkable = [i for i in todo if i.candidates is not None or not task.protocol.use_chroma]
    workers = fast_workers(task.protocol.workers, len(forkable))
    local = todo
    try:
        if workers > 1:
            local = [i for i in todo if not (i.candidates is not None or not task.protocol.use_chroma)]
            for rec in _fast_parallel(forkable, rankers, metrics_of, workers=workers):
                results.append(rec)
                bar.update(1)
        for imp in local:
            results.append(fast_record(imp, rankers, metrics_of))
            bar.update(1)
    finally:
        gc.unfreeze()
    bar.close()
    fast_s = time.perf_counter() - t
    speed["fast"] = {
        "impressions": len(todo),
        "seconds": round(fast_s, 3),
        "impressions_per_s": round(len(todo) / fast_s, 1) if todo and fast_s > 0 else None,
        "bm25_index_s": round(bm25_s, 3),
        "workers": workers,
    }

    # ---- LLM phase ----------------------------------------------------------------------------
    llm_block = None
    sample_ids: list[str] = []
    if run_llm:
        from eval.llm_phase import run_llm_phase

        sample = llm_sample(items, task.llm.sample, task.llm.sample_seed)
        todo_llm = [i for i in sample if i.impression_id not in results.done["llm"]]
        bar = _progress(len(todo_llm), "eval llm", show_progress)
        llm_s = asyncio.run(
            run_llm_phase(
                todo_llm, selector=selector, spec=task.llm, seed=task.protocol.seed, metrics_of=metrics_of,
                pool_size_of=lambda i: None if i.candidates is not None else len(index),
                on_result=lambda r: results.append(r, flush=True), progress=bar,
            )
        )  # fmt: skip
        bar.close()
        speed["llm"] = {
            "impressions": len(todo_llm),
            "seconds": round(llm_s, 3),
            "impressions_per_s": round(len(todo_llm) / llm_s, 3) if todo_llm and llm_s > 0 else None,
            "concurrency": task.llm.concurrency,
        }
        sample_ids = [i.impression_id for i in sample]
        llm_block = {"sample_size": len(sample), "sample_seed": task.llm.sample_seed, "sample_ids_head": sample_ids[:20]}

    # ---- aggregate ----------------------------------------------------------------------------
    fast, llm = results.done["fast"], results.done.get("llm", {})
    llm_systems = {s for s in systems if s in LLM_SYSTEMS}
    agg = aggregate(order=order, fast=fast, llm=llm, systems=systems, llm_systems=llm_systems, names=names, boot=task.bootstrap)
    if llm_block is not None:
        sample_ids = [i.impression_id for i in llm_sample(items, task.llm.sample, task.llm.sample_seed)]
        on_sample = [s for s in systems if s in ("default", *LLM_SYSTEMS)]
        sub = aggregate(order=sample_ids, fast=fast, llm=llm, systems=on_sample, llm_systems=llm_systems, names=names, boot=task.bootstrap)
        llm_block.update(
            {
                "sample_metrics": {"metrics": sub["metrics"], "ci": sub["ci"], "n": sub["n"]},
                "summary": llm_summary(llm, sample_ids),
                "cache": stack.llm.stats.to_dict(),
                "cache_entries": len(stack.llm.cache) if stack.llm.cache is not None else None,
            }
        )
    for s in not_run:
        agg["n"][s] = 0
    fusion: FusionModel = env.services.fusion
    calib: dict[str, Any] = {}
    if "default" in systems:
        c = calibration(fast, order, system="default", pctr=fusion.pctr, boot=task.bootstrap)
        if c is not None:
            calib["default"] = c
    if llm_block is not None and "default+llm" in systems:
        c = calibration(llm, sample_ids, system="default+llm", pctr=fusion.pctr, boot=task.bootstrap)
        if c is not None:
            both = [i for i in sample_ids if i in llm and "scores" in llm[i]]
            same = calibration(fast, both, system="default", pctr=fusion.pctr, boot=task.bootstrap)
            if same is not None:
                c["default_on_same_impressions"] = {k: same[k] for k in ("impressions", "rows", "logloss", "logloss_ci", "ece")}
            calib["default+llm"] = c
    protocols: dict[str, int] = {}
    for i in items:
        protocols[i.protocol] = protocols.get(i.protocol, 0) + 1
    speed["setup"] = {k: round(v, 3) for k, v in env.timings_s.items()} | {"reused": env.reused}
    report: dict[str, Any] = {
        "metrics": agg["metrics"],
        "n_impressions": len(items),
        "skipped": loaded.skipped,
        "config": task.to_jsonable(),
        "provenance": {
            "git": git_state(),
            "created": now_iso(),
            "prompt": stack.prompt_info if stack else None,
            "model": stack.model if stack else None,
            "llm_server": stack.served_by if stack else None,
            "decoding": stack.llm.decoding if stack else None,
            "fusion_weights": {
                "path": fusion.meta.get("path"),
                "sha256": fusion_provenance(fusion)["sha256"],
                "weights": {k: v for k, v in fusion.to_json().items() if k != "meta"},
            },
            "catalog_hash": env.catalog_hash,
            "collection": env.collection,
            "behaviour_dir": str(env.behaviour_dir),
            "behaviour_train": env.train,
            "runtime": runtime(),
        },
        "ci": agg["ci"],
        "n": agg["n"],
        "paired_vs_default": agg["paired_vs_default"],
        "metric_names": names,
        "n_read": loaded.n_read,
        "protocols": protocols,
        "data_warnings": loaded.warnings,
        "not_run": not_run,
        "candidate_stage": candidate_stage(fast, order, task.protocol.recall_ks, task.bootstrap),
        "llm": llm_block,
        "position_bias": position_bias(llm, order) if llm_block else None,
        "calibration": calib or None,
        "rewrites": rewrite_summary(llm, sample_ids) if llm_block and task.llm.rewrite else None,
        "fusion": {
            "weights": fusion_provenance(fusion),
            "separation": fusion_separation(fusion, loaded.users, file_sha256(imp_path), task.data.limit),
        },
        "speed": speed,
        "repo_root": str(REPO_ROOT),
    }
    return report


def _write(report: dict, out_dir: Path) -> None:
    from eval.plots import plot_ndcg, plot_position_bias, plot_reliability

    plots = []
    for fn, name in (
        (plot_ndcg, "ndcg_at_k.png"),
        (plot_position_bias, "position_bias.png"),
        (plot_reliability, "reliability.png"),
    ):
        try:
            p = fn(report, out_dir / name)
        except Exception:  # a plot must never lose the numbers
            log.exception("plot failed", extra={"plot": name})
            p = None
        if p is not None:
            plots.append(name)
    report["plots"] = plots
    (out_dir / "report.json").write_text(dumps(report))
    (out_dir / "report.md").write_text(render_markdown(report))
