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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kernel.errors import UserError
from kernel.settings import Settings
from eval.config import EvalTask, TaskError, resolve_path, validate_task
from eval.data import EvalImpression, load_impressions
from eval.env import EvalEnv, prepare_env
from eval.exposure import SLATE_K, read_catalog
from eval.metrics import metrics_by_protocol
from eval.provenance import data_hashes, dumps, file_sha256, now_iso, run_fingerprint
from eval.report import build_report, metric_names
from eval.report_md import render_markdown
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


def fast_record(imp: EvalImpression, rankers, metrics_of) -> dict[str, Any]:
    res = rankers.run(imp)
    rec: dict[str, Any] = {
        "phase": "fast",
        "impression_id": imp.impression_id,
        "protocol": imp.protocol,
        "metrics": metrics_of(imp, res.rankings, res.pool_size),
        "top": {s: r[:SLATE_K] for s, r in res.rankings.items()},  # the served slate of each system: exposure
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
    return list(fast_records(items[bounds[0] : bounds[1]], rankers, metrics_of))


def fast_records(items: list[EvalImpression], rankers, metrics_of) -> Iterator[dict[str, Any]]:
    """The fast records of a block of impressions, in order, each as it finishes (the block's sequence
    states computed in one batch first: FastRankers.batch)."""
    with rankers.batch(items):
        for imp in items:
            yield fast_record(imp, rankers, metrics_of)


FAST_CHUNK_MIN, FAST_CHUNK_MAX = 250, 2000  # impressions per fast-phase task (fast_chunk_size)


def fast_chunk_size(n: int, workers: int) -> int:
    """Impressions per task of the worker pool: about 4 tasks per worker (the last ones even out the
    workers' finishing times), at least FAST_CHUNK_MIN (the batched sequence pass wants many histories
    of each length), at most FAST_CHUNK_MAX (results arrive, and are written, as tasks finish)."""
    return max(FAST_CHUNK_MIN, min(FAST_CHUNK_MAX, -(-n // (4 * max(1, workers)))))


def _fast_parallel(items: list[EvalImpression], rankers, metrics_of, *, workers: int, chunk: int | None = None):
    """Fast records in input order, computed by `workers` forked processes."""
    import multiprocessing as mp

    global _FORKED
    _FORKED = (rankers, metrics_of, items)
    size = chunk or fast_chunk_size(len(items), workers)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            for recs in pool.imap(_fast_chunk, [(i, i + size) for i in range(0, len(items), size)]):
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
    llm_cache_path: Path | None = None,
    backend=None,
) -> dict[str, Any]:
    """Run one eval task and write DIR/report.json, report.md and plots; returns the report.

    `backend` (eval.distributed.RayBackend) runs the reading, the fast phase and the LLM phase on Ray
    actors instead of this process; the metrics come from the same records in the same order.

    `llm_inner` replaces the chat client (tests); `llm_cache_path` the LLM cache file (default
    data_dir/eval/llm_cache.sqlite)."""
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
    hashes = data_hashes(ads=task.data.ads, impressions=task.data.impressions, train=list(task.data.train), resolve=resolve_path)
    fingerprint = run_fingerprint(task_sha256=task.sha256(), data=hashes, weights_path=weights_path)
    run_file = out_dir / RUN
    if resume:
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise ResumeMismatch(f"{out_dir}: cannot resume: the task, data or weights differ from the interrupted run")
        elif (out_dir / RESULTS).exists():
            raise ResumeMismatch(f"{out_dir}: cannot resume: {RESULTS} has no {RUN} saying which task it belongs to")
    write_atomic(run_file, dumps({"fingerprint": fingerprint, "task": task.to_jsonable(), "started": now_iso()}))

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
                task.llm, data_dir=settings.data_dir, prompts_dir=settings.prompts_dir, settings=eval_settings, inner=llm_inner,
                cache_path=llm_cache_path,
            )
        env_args = {"ads_path": ads_path, "train_paths": train_paths, "weights_path": weights_path}
        env = prepare_env(
            eval_settings, **env_args, reranker=stack.reranker if stack else None, show_progress=show_progress,
            count_behaviour=backend.behaviour_counter() if backend is not None else None,
        )  # fmt: skip
        if backend is not None:  # its actors build the same environment (reused from the data dir) once each
            backend = backend.bind(settings=eval_settings, env_args=env_args, llm_cache_path=llm_cache_path)
        report = _run(
            task, env, stack=stack, systems=systems, run_llm=run_llm, not_run=not_run, results=results,
            imp_path=imp_path, ads_path=ads_path, show_progress=show_progress, backend=backend,
            variants_args={"settings": eval_settings, "llm_inner": llm_inner, "llm_cache_path": llm_cache_path},
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
            "data": hashes,
        }
    )
    _write(report, out_dir)
    return report


def _fast_phase(task: EvalTask, env: EvalEnv, rankers, items: list[EvalImpression], *, results: ResultsLog, metrics_of, show_progress: bool) -> dict:
    """Every missing fast record, appended to `results`; returns the phase's speed block."""
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
        for at in range(0, len(local), FAST_CHUNK_MAX):
            for rec in fast_records(local[at : at + FAST_CHUNK_MAX], rankers, metrics_of):
                results.append(rec)
                bar.update(1)
    finally:
        gc.unfreeze()
    bar.close()
    fast_s = time.perf_counter() - t
    return {
        "impressions": len(todo),
        "seconds": round(fast_s, 3),
        "impressions_per_s": round(len(todo) / fast_s, 1) if todo and fast_s > 0 else None,
        "workers": workers,
    }


def _llm_phase(task: EvalTask, env: EvalEnv, sample: list[EvalImpression], *, results: ResultsLog, metrics_of, show_progress: bool) -> dict:
    """Every missing LLM record of the sample, appended (and flushed) as it finishes; returns the speed block."""
    from eval.llm_phase import run_llm_phase

    index = env.services.index
    todo_llm = [i for i in sample if i.impression_id not in results.done["llm"]]
    bar = _progress(len(todo_llm), "eval llm", show_progress)
    llm_s = asyncio.run(
        run_llm_phase(
            todo_llm, selector=env.services.selector, spec=task.llm, seed=task.protocol.seed, metrics_of=metrics_of,
            pool_size_of=lambda i: None if i.candidates is not None else len(index),
            on_result=lambda r: results.append(r, flush=True), progress=bar,
        )
    )  # fmt: skip
    bar.close()
    return {
        "impressions": len(todo_llm),
        "seconds": round(llm_s, 3),
        "impressions_per_s": round(len(todo_llm) / llm_s, 3) if todo_llm and llm_s > 0 else None,
        "concurrency": task.llm.concurrency,
    }


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
    ads_path: Path,
    show_progress: bool,
    backend=None,
    variants_args: dict[str, Any] | None = None,
) -> dict:
    """task → environment → systems → run (fast phase, LLM phase) → metrics → report (eval.report.build_report)."""
    from eval.bm25 import BM25Index
    from eval.rankers import FastRankers

    selector = env.services.selector
    selector.generator.use_chroma = task.protocol.use_chroma
    names = metric_names(task.protocol.recall_ks)
    catalog = read_catalog(ads_path)  # advertiser / category for exposure; whether any ad has a bid
    has_bids = any(meta["bid"] is not None for meta in catalog.values())
    bids = {a.ad_id: a.bid for a in env.services.index.ads} if has_bids else None  # as served: an ad without a bid bids 1.0
    metrics_of = metrics_by_protocol([m for m in names if not m.startswith("recall@")], names, bids=bids)

    fast_systems = [s for s in systems if s in FAST_SYSTEMS]
    if "sequence" in fast_systems and selector.generator.sequence is None:  # disabled (ADSELECT_SEQUENCE_ENABLED) or untrained
        fast_systems.remove("sequence")
        not_run = {**not_run, "sequence": "no_sequence_model"}
    t = time.perf_counter()
    bm25 = BM25Index(env.services.index.ads) if "bm25" in fast_systems else None
    bm25_s = time.perf_counter() - t
    rankers = FastRankers(
        selector=selector, bm25=bm25, systems=fast_systems,
        n_retrieve=task.protocol.n_retrieve, use_chroma=task.protocol.use_chroma, seed=task.protocol.seed,
        rank_by=env.settings.rank_by,
    )  # fmt: skip
    if backend is not None:
        loaded, fast_speed = backend.fast_phase(
            task, imp_path=imp_path, fast_systems=fast_systems, names=names, results=results, show_progress=show_progress,
        )  # fmt: skip
    else:
        loaded = load_impressions(imp_path, catalog=env.services.index.row, limit=task.data.limit)
        for imp in loaded.items:  # no system, the LLM's included, ever sees the logged display order
            imp.candidates = rankers.canonical(imp.candidates)
        fast_speed = _fast_phase(task, env, rankers, loaded.items, results=results, metrics_of=metrics_of, show_progress=show_progress)
    items = loaded.items
    speed: dict[str, Any] = {"fast": fast_speed}
    speed["fast"]["bm25_index_s"] = round(bm25_s, 3)
    sample: list[EvalImpression] | None = None
    if run_llm:
        sample = llm_sample(items, task.llm.sample, task.llm.sample_seed)
        llm_phase = backend.llm_phase if backend is not None else _llm_phase
        speed["llm"] = llm_phase(task, env, sample, results=results, metrics_of=metrics_of, show_progress=show_progress)
    runs = None
    if task.variants and not task.no_llm:  # LLM variants side by side on the same sample (eval/variants.py)
        from eval.variants import run_variants

        vsample = sample if sample is not None else llm_sample(items, task.llm.sample, task.llm.sample_seed)
        runs = run_variants(
            task, env, vsample, results=results, metrics_of=metrics_of, server=stack.server if stack else None,
            show_progress=show_progress, **(variants_args or {}),
        )  # fmt: skip
    speed["setup"] = {k: round(v, 3) for k, v in env.timings_s.items()} | {"reused": env.reused}
    report = build_report(
        task=task, env=env, stack=stack, systems=systems, not_run=not_run, loaded=loaded, names=names,
        fast=results.done["fast"], llm=results.done.get("llm", {}), sample=sample, speed=speed,
        impressions_sha256=file_sha256(imp_path), catalog=catalog, bids_available=has_bids, rank_by=env.settings.rank_by,
    )  # fmt: skip
    if runs is not None:
        from eval.variants import variants_report

        report["variants"] = variants_report(task, vsample, results.done, runs)
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
    write_atomic(out_dir / "report.json", dumps(report))
    md = render_markdown(report)
    if report.get("variants"):
        from eval.variants import variants_markdown

        md += variants_markdown(report["variants"])
    write_atomic(out_dir / "report.md", md)


def write_atomic(path: Path, text: str) -> None:
    """Write-temp-then-rename: a reader (or a resume after SIGKILL) sees the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
