"""LLM variants side by side: several (prompt, model, mode, decoding) variants of one task, each a system
of the same run on the same LLM sample, each reported with paired differences against the others.

    task.variants ─▶ per variant: LLMSpec (task.llm + the fields that change), Settings overrides,
        an LLM stack over the SHARED cache file (identical calls are made once) and, for the bundled
        model, the one llama.cpp server of the run ─▶ the variant's Selector (`variant_selector`)
        ─▶ eval.llm_phase on the sample, records as phase `llm@NAME` in results.jsonl (resumable)
        ─▶ report["variants"]: per variant, per pair of variants (paired bootstrap CIs).

Per variant: nDCG@10 and MRR of `default+llm` (the served, fused order) and of `llm` (the LLM's own
order), each with a CI; the top-pick flip rate when the sent candidates are reversed (with a CI);
the valid-answer rate (the LLM stage answered usably: not degraded); prompt and completion tokens per
impression (over the impressions whose serving call answered) and LLM calls per impression of the serving decision (the position-bias probes are not
counted); LLM latency p50/p99 over the impressions whose serving call reached the model (a cache hit
costs nothing and is left out; `cache_hit_rate` says how many were).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from eval.bootstrap import mean_with_ci, paired_diff
from eval.config import EvalTask, TaskError, VariantSpec
from eval.data import EvalImpression

log = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr")
SYSTEMS = ("default+llm", "llm")


def phase_name(variant: str) -> str:
    return f"llm@{variant}"


def variant_selector(base, *, stack, settings, llm_url=None):
    """The Selector a variant is served with: the run's Selector with the variant's LLM stage.

    The one place a mode is turned into a Selector: listwise swaps the reranker (as experiment arms
    with their own prompt do, selection.services.arm_policies); scoring mode (`llm_mode: score`) gets the
    service's scorer (selection.services.make_scorer) over `llm_url()`, the variant's server. Scoring
    calls are one-token logprob requests: they do not go through the run's LLM cache."""
    if settings.llm_mode == "score":
        from selection.services import make_scorer

        url = llm_url() if llm_url is not None else None
        if not url:
            raise TaskError("variant mode 'score' needs an OpenAI-compatible server (the variant's url or the bundled one)")
        return replace(base, llm_mode="score", scorer=make_scorer(settings, llm_url=url), arm_policies={})
    if settings.llm_mode != "listwise":
        raise TaskError(f"variant mode {settings.llm_mode!r}: listwise or score")
    return replace(base, llm_mode="listwise", reranker=stack.reranker, arm_policies={})


async def run_variant_phase(items: list[EvalImpression], *, selector, **phase) -> float:
    """eval.llm_phase.run_llm_phase for one variant's Selector. A scoring-mode variant's logprob client is
    closed here, in the loop that used it (its pooled connections belong to that loop), on every exit."""
    from eval.llm_phase import run_llm_phase

    try:
        return await run_llm_phase(items, selector=selector, **phase)
    finally:
        if selector.llm_mode == "score" and selector.scorer is not None:
            await selector.scorer.llm.aclose()


def run_variants(
    task: EvalTask,
    env,
    sample: list[EvalImpression],
    *,
    results,
    metrics_of,
    settings,
    server=None,
    llm_inner=None,
    llm_cache_path: Path | None = None,
    show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every variant's LLM phase (missing records only) and return each variant's cache stats and
    prompt info. `settings`: the run's eval settings (data dir of the shared cache, the service options
    the variant's overrides apply to). `server`: a LazyLocalLLM to share (else one is made and stopped
    here); `llm_inner` replaces the chat client of every variant (tests)."""
    from eval.harness import _progress
    from eval.llm_phase import LazyLocalLLM, SharedServerClient, build_llm_stack

    index = env.services.index
    owned = None
    out: dict[str, dict[str, Any]] = {}
    try:
        for v in task.variants:
            spec = v.llm_spec(task.llm)
            vsettings = settings.model_copy(
                update={**v.settings_overrides(), "prompt_name": spec.prompt, "llm_model": spec.model}
            )
            inner = llm_inner
            if inner is None and not spec.url:
                if server is None:
                    server = owned = LazyLocalLLM(task.llm, settings)
                inner = SharedServerClient(server, spec)
            stack = build_llm_stack(
                spec, data_dir=settings.data_dir, prompts_dir=settings.prompts_dir, settings=vsettings, inner=inner,
                cache_path=llm_cache_path,
            )  # fmt: skip
            try:
                def url_of(spec=spec, server=server):
                    if spec.url:
                        return spec.url
                    return server.ensure() if server is not None else None

                selector = variant_selector(env.services.selector, stack=stack, settings=vsettings, llm_url=url_of)
                phase = phase_name(v.name)
                todo = [i for i in sample if i.impression_id not in results.done.get(phase, {})]
                bar = _progress(len(todo), f"eval {phase}", show_progress)
                seconds = asyncio.run(
                    run_variant_phase(
                        todo, selector=selector, spec=spec, seed=task.protocol.seed, metrics_of=metrics_of,
                        pool_size_of=lambda i: None if i.candidates is not None else len(index),
                        on_result=lambda r: results.append(r, flush=True), progress=bar, phase=phase,
                    )
                )  # fmt: skip
                bar.close()
                out[v.name] = {
                    "spec": v.model_dump(exclude_none=True),
                    "prompt": selector.scorer.prompt_info if selector.llm_mode == "score" else stack.prompt_info,
                    "model": spec.model,
                    "cache": stack.llm.stats.to_dict(),
                    "seconds": round(seconds, 3),
                    "impressions_run": len(todo),
                }
            finally:
                stack.close()  # this variant's client and cache connection (a shared server is stopped below)
    finally:
        if owned is not None:
            owned.stop()
    return out


def _flip(rec: dict[str, Any]) -> float | None:
    """1 if the LLM's top pick changes when the sent candidates are reversed, 0 if not, None if either failed."""
    bias = rec.get("position_bias") or {}
    a, b = (bias.get("prior") or {}).get("top"), (bias.get("reversed") or {}).get("top")
    return None if a is None or b is None else float(a != b)


def _ci(values: list[float | None], boot) -> dict[str, Any]:
    mean, lo, hi = mean_with_ci(values, n_boot=boot.n_boot, seed=boot.seed, level=boot.level)
    n = sum(v is not None for v in values)
    return {"mean": None if n == 0 else mean, "lo": None if n == 0 else lo, "hi": None if n == 0 else hi, "n": n}


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def per_impression(rec: dict[str, Any]) -> dict[str, float | None]:
    """The per-impression values a variant is judged by (aligned across variants by impression id)."""
    vals: dict[str, float | None] = {}
    for system in SYSTEMS:
        for m in METRICS:
            vals[f"{system}:{m}"] = (rec["metrics"].get(system) or {}).get(m)
    vals["flip_reversed"] = _flip(rec)
    vals["valid"] = float(bool(rec.get("llm_used")) and not rec.get("degraded_reason"))
    return vals


def variants_report(task: EvalTask, sample: list[EvalImpression], done: dict[str, dict], runs: dict[str, dict]) -> dict[str, Any]:
    """report["variants"]: per variant the figures of the module doc, and every pair's paired differences."""
    boot = task.bootstrap
    order = [i.impression_id for i in sample]
    names = [v.name for v in task.variants]
    recs = {n: [done.get(phase_name(n), {}).get(i) for i in order] for n in names}
    values = {n: [per_impression(r) if r is not None else None for r in recs[n]] for n in names}
    keys = [f"{s}:{m}" for s in SYSTEMS for m in METRICS] + ["flip_reversed", "valid"]
    per_variant: dict[str, Any] = {}
    for n in names:
        got = [r for r in recs[n] if r is not None]
        vals = [v for v in values[n] if v is not None]
        calls = [r.get("llm_calls") or {} for r in got]
        lat = [c["llm_ms"] for c in calls if c.get("misses")]
        usage = [r["usage"] for r in got if r.get("usage")]  # the impressions whose serving call answered
        per_variant[n] = {
            **runs.get(n, {}),
            "impressions": len(got),
            **{k: _ci([v[k] for v in vals], boot) for k in keys},
            "prompt_tokens_per_impression": float(np.mean([u.get("prompt_tokens", 0) for u in usage])) if usage else None,
            "completion_tokens_per_impression": float(np.mean([u.get("completion_tokens", 0) for u in usage])) if usage else None,
            "calls_per_impression": float(np.mean([c.get("calls", 0) for c in calls])) if calls else None,
            "cache_hit_rate": (sum(1 for c in calls if c.get("calls") and not c.get("misses")) / len(calls)) if calls else None,
            "llm_latency_ms": {"p50": _percentile(lat, 50), "p99": _percentile(lat, 99), "n": len(lat)},
            "degraded": _count(r.get("degraded_reason") for r in got),
        }
    pairs: dict[str, Any] = {}
    for a, b in itertools.combinations(names, 2):
        both = [(x, y) for x, y in zip(values[a], values[b], strict=True) if x is not None and y is not None]
        entry = {}
        for k in keys:
            d, lo, hi = paired_diff([x[k] for x, _ in both], [y[k] for _, y in both], n_boot=boot.n_boot, seed=boot.seed, level=boot.level)
            n = sum(1 for x, y in both if x[k] is not None and y[k] is not None)
            entry[k] = {"diff": None if n == 0 else d, "lo": None if n == 0 else lo, "hi": None if n == 0 else hi, "n": n}
        pairs[f"{a} - {b}"] = entry
    return {"variants": per_variant, "paired": pairs, "sample": len(order), "level": boot.level}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        if v:
            out[v] = out.get(v, 0) + 1
    return out


def _fmt(ci: dict[str, Any], *, pct: bool = False) -> str:
    if ci.get("mean", ci.get("diff")) is None:
        return "n/a"
    x = ci.get("mean", ci.get("diff"))
    scale, unit = (100, "%") if pct else (1, "")
    return f"{x * scale:.3f}{unit} [{ci['lo'] * scale:.3f}, {ci['hi'] * scale:.3f}]"


def variants_markdown(rep: dict[str, Any]) -> str:
    """The side-by-side table and the paired differences, for report.md."""
    lines = [
        "", f"## LLM variants side by side ({rep['sample']} impressions, {rep['level']:.0%} CIs)", "",
        "| variant | prompt | nDCG@10 (default+llm) | MRR (default+llm) | nDCG@10 (llm) | flip rate reversed | valid answers "
        "| prompt tok/imp | completion tok/imp | calls/imp | LLM p50 ms | LLM p99 ms | cache hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, v in rep["variants"].items():
        p = v.get("prompt", {})
        lat = v["llm_latency_ms"]
        num = lambda x, f="{:.1f}": "n/a" if x is None else f.format(x)  # noqa: E731
        lines.append(
            f"| {name} | {p.get('name', '?')} v{p.get('version', '?')} {p.get('sha256', '')[:8]} | {_fmt(v['default+llm:ndcg@10'])} "
            f"| {_fmt(v['default+llm:mrr'])} | {_fmt(v['llm:ndcg@10'])} | {_fmt(v['flip_reversed'])} | {_fmt(v['valid'])} "
            f"| {num(v['prompt_tokens_per_impression'])} | {num(v['completion_tokens_per_impression'])} | {num(v['calls_per_impression'], '{:.2f}')} "
            f"| {num(lat['p50'], '{:.0f}')} | {num(lat['p99'], '{:.0f}')} | {num(v['cache_hit_rate'], '{:.0%}')} |"
        )
    if rep["paired"]:
        lines += ["", "Paired differences (first minus second, same impressions):", "",
                  "| pair | nDCG@10 (default+llm) | MRR (default+llm) | nDCG@10 (llm) | flip rate reversed | valid answers |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for pair, d in rep["paired"].items():
            lines.append(
                f"| {pair} | {_fmt(d['default+llm:ndcg@10'])} | {_fmt(d['default+llm:mrr'])} | {_fmt(d['llm:ndcg@10'])} "
                f"| {_fmt(d['flip_reversed'])} | {_fmt(d['valid'])} |"
            )
    return "\n".join(lines) + "\n"


__all__ = ["VariantSpec", "phase_name", "run_variant_phase", "run_variants", "variant_selector", "variants_markdown", "variants_report"]
