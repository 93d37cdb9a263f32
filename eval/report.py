"""From per-impression results to report.json's numbers and report.md's tables.

Every number is a mean over impressions with a 95% percentile-bootstrap interval (eval.metrics);
each system is compared with `default` on the same impressions (paired bootstrap of differences).
Metrics that do not apply to a protocol (recall@K on logged candidates) are null, and every
requested system appears, with null metrics when it was not run.

Revenue (`revenue@k`, when the catalog gives bids; else the report says there are none) and exposure
(eval.exposure: by advertiser and category, Gini, coverage) are per system, `served` among them: default's
candidates in the order the endpoint serves them (bid × pCTR).

Calibration (eval.calibration) and provenance (eval.provenance) have their own modules; `build_report`
assembles report.json from the run's records, and eval.report_md renders report.md. Rewrites: per LLM
impression with `llm.rewrite` on, whether the top ad was served with rewritten copy, and the share of
impressions with each refusal reason.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from eval.config import BootstrapSpec
from eval.exposure import SLATE_K, exposure_by_system
from eval.metrics import REVENUE_KS, mean_with_ci, paired_diff, revenue_names
from eval.systems import BASELINE

SAMPLED_SCALE = f"{BASELINE} (sampled-row scale)"  # calibration of BASELINE with the prior correction undone

NO_BIDS = (
    "no ad in the catalog has a bid: revenue would only count clicks, and the served order (bid × pCTR, every bid 1.0) "
    "is the pCTR order, i.e. the relevance order"
)

BASE_METRICS: tuple[str, ...] = ("auc", "mrr", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20", "hit@1", "hit@5", "hit@10")


def metric_names(recall_ks: Sequence[int]) -> list[str]:
    return [*BASE_METRICS, *(f"recall@{k}" for k in recall_ks)]


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _values(records: dict[str, dict], order: list[str], system: str, metric: str) -> list[float | None]:
    out: list[float | None] = []
    for iid in order:
        rec = records.get(iid)
        m = rec["metrics"].get(system) if rec is not None else None
        out.append(m.get(metric) if m is not None else None)
    return out


def aggregate(
    *,
    order: list[str],
    fast: dict[str, dict],
    llm: dict[str, dict],
    systems: list[str],
    llm_systems: set[str],
    names: list[str],
    boot: BootstrapSpec,
) -> dict[str, Any]:
    """metrics / ci / n / paired_vs_default over the impressions in `order`."""
    kw = {"n_boot": boot.n_boot, "seed": boot.seed, "level": boot.level}
    values: dict[str, dict[str, list[float | None]]] = {}
    metrics: dict[str, dict[str, float | None]] = {}
    ci: dict[str, dict[str, list[float] | None]] = {}
    n: dict[str, int] = {}
    for s in systems:
        recs = llm if s in llm_systems else fast
        values[s] = {m: _values(recs, order, s, m) for m in names}
        n[s] = sum(1 for iid in order if iid in recs and s in recs[iid]["metrics"])
        metrics[s], ci[s] = {}, {}
        for m in names:
            mean, lo, hi = mean_with_ci(values[s][m], **kw)
            metrics[s][m] = _num(mean)
            ci[s][m] = None if _num(mean) is None else [float(lo), float(hi)]
    paired: dict[str, dict[str, dict[str, float | int | None]]] = {}
    if BASELINE in systems:
        for s in systems:
            if s == BASELINE:
                continue
            paired[s] = {}
            for m in names:
                a, b = values[s][m], values[BASELINE][m]
                both = sum(1 for x, y in zip(a, b) if x is not None and y is not None)
                d, lo, hi = paired_diff(a, b, **kw)
                paired[s][m] = {"diff": _num(d), "lo": _num(lo), "hi": _num(hi), "n": both}
    return {"metrics": metrics, "ci": ci, "n": n, "paired_vs_default": paired}


def revenue_summary(
    *,
    order: list[str],
    sample_ids: list[str] | None,
    fast: dict[str, dict],
    llm: dict[str, dict],
    systems: list[str],
    llm_systems: set[str],
    boot: BootstrapSpec,
    available: bool,
    rank_by: str,
) -> dict[str, Any]:
    """revenue@k per system (mean over impressions, bootstrap CI, paired vs default), beside the relevance metrics.

    `available` False (the catalog has no bids): says so instead of reporting a revenue."""
    block: dict[str, Any] = {
        "available": available,
        "served_rank_by": rank_by,
        "definition": "revenue@k: Σ bid of the clicked ads in a system's top k, per impression (each click pays its ad's bid)",
    }
    if not available:
        return block | {"reason": NO_BIDS}
    names = revenue_names(REVENUE_KS)
    agg = aggregate(order=order, fast=fast, llm=llm, systems=systems, llm_systems=llm_systems, names=names, boot=boot)
    block |= {"ks": list(REVENUE_KS), "metric_names": names, **agg}
    if sample_ids is not None:
        on_sample = [x for x in systems if x in (BASELINE, "served") or x in llm_systems]
        sub = aggregate(order=sample_ids, fast=fast, llm=llm, systems=on_sample, llm_systems=llm_systems, names=names, boot=boot)
        block["sample_metrics"] = {"metrics": sub["metrics"], "ci": sub["ci"], "n": sub["n"]}
    return block


def exposure_summary(
    *, order: list[str], sample_ids: list[str] | None, fast: dict[str, dict], llm: dict[str, dict], systems: list[str], llm_systems: set[str], catalog
) -> dict[str, Any]:
    """Per system, exposure of its top SLATE_K (eval.exposure): shares and Gini by advertiser and by category,
    catalog coverage. The LLM systems over the LLM sample (`default` on the same sample beside them)."""
    out: dict[str, Any] = {"k": SLATE_K, "catalog_ads": len(catalog)}
    out["systems"] = exposure_by_system(fast, order, [x for x in systems if x not in llm_systems], catalog)
    if sample_ids is not None and llm_systems:
        out["systems"] |= exposure_by_system(llm, sample_ids, [x for x in systems if x in llm_systems], catalog)
        out["sample"] = exposure_by_system(fast, sample_ids, [x for x in systems if x == BASELINE], catalog)
    return out


def candidate_stage(fast: dict[str, dict], order: list[str], recall_ks: Sequence[int], boot: BootstrapSpec) -> dict | None:
    full = [fast[i] for i in order if i in fast and fast[i].get("protocol") == "full"]
    if not full:
        return None
    kw = {"n_boot": boot.n_boot, "seed": boot.seed, "level": boot.level}
    out: dict[str, Any] = {"n": len(full)}
    for k in recall_ks:
        vals = [r["metrics"].get(BASELINE, {}).get(f"recall@{k}") for r in full]
        mean, lo, hi = mean_with_ci(vals, **kw)
        out[f"recall@{k}"] = _num(mean)
        out[f"recall@{k}_ci"] = None if _num(mean) is None else [lo, hi]
    hits = [1.0 if r["cand"]["hit"] else 0.0 for r in full]
    mean, lo, hi = mean_with_ci(hits, **kw)
    out["coverage"] = _num(mean)  # clicked anywhere in the generated set
    out["coverage_ci"] = [lo, hi]
    out["mean_candidates"] = sum(r["cand"]["size"] for r in full) / len(full)
    return out


def rewrite_summary(llm: dict[str, dict], order: list[str]) -> dict[str, Any] | None:
    """Over the LLM impressions of `order` that asked for a rewrite (records with a "rewrite" entry).

    `served`: the top ad showed rewritten copy; `copy_ok`: some ad of the decision did (copy_ok − served:
    the rewrite passed but was written for an ad below the top); `copy_discarded`: the LLM answered but
    no rewrite passed and the validator gave no reason (the parser dropped the copy: missing, empty,
    too long, or written for a dropped id). `violations[reason]`: share of requested impressions with
    that reason at least once (degraded impressions count as requested)."""
    recs = [llm[i] for i in order if i in llm and llm[i].get("rewrite") is not None]
    if not recs:
        return None
    n = len(recs)
    reasons: Counter[str] = Counter()
    discarded = 0
    for r in recs:
        rw = r["rewrite"]
        reasons.update(set(rw["rejections"]))
        copy_reasons = [x for x in rw["rejections"] if not x.startswith("justification_")]
        if r.get("llm_used") and not rw["copy_ok"] and not copy_reasons:
            discarded += 1
    served = sum(1 for r in recs if r["rewrite"]["top_served"])
    copy_ok = sum(1 for r in recs if r["rewrite"]["copy_ok"])
    return {
        "requested": n,
        "answered": sum(1 for r in recs if r.get("llm_used")),
        "served": served,
        "share_served": served / n,
        "copy_ok": copy_ok,
        "share_copy_ok": copy_ok / n,
        "copy_discarded": discarded,
        "any_violation": sum(1 for r in recs if r["rewrite"]["rejections"]) / n,
        "violations": {k: v / n for k, v in sorted(reasons.items())},
        "violation_counts": dict(sorted(reasons.items())),
    }


def llm_summary(llm: dict[str, dict], order: list[str]) -> dict[str, Any]:
    recs = [llm[i] for i in order if i in llm]
    reasons = Counter(r["degraded_reason"] for r in recs if r.get("degraded_reason"))
    lat = sorted(r["latency_ms"] for r in recs)
    tokens = Counter()
    for r in recs:
        for k, v in (r.get("usage") or {}).items():
            tokens[k] += v
    return {
        "impressions": len(recs),
        "llm_used": sum(1 for r in recs if r.get("llm_used")),
        "degraded": dict(reasons),
        "latency_ms": {
            "p50": lat[len(lat) // 2] if lat else None,
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "mean": (sum(lat) / len(lat)) if lat else None,
        },
        "tokens": dict(tokens),
    }


def position_bias(llm: dict[str, dict], order: list[str]) -> dict[str, Any] | None:
    recs = [llm[i]["position_bias"] for i in order if i in llm and llm[i].get("position_bias")]
    if not recs:
        return None
    out: dict[str, Any] = {"impressions": len(recs), "orderings": {}}
    for name in ("prior", "reversed", "shuffled"):
        tops = [(b[name]["top"], b[name]["order"]) for b in recs if b.get(name)]
        ok = [(t, o) for t, o in tops if t is not None]
        positions = [o.index(t) for t, o in ok if t in o]
        entry: dict[str, Any] = {
            "answered": len(ok),
            "errors": len(tops) - len(ok),
            "top_pick_first_rate": (sum(1 for p in positions if p == 0) / len(positions)) if positions else None,
            "mean_top_pick_position": (sum(positions) / len(positions)) if positions else None,
            "top_pick_positions": dict(sorted(Counter(positions).items())),
        }
        if name != "prior":
            pairs = [(b["prior"]["top"], b[name]["top"]) for b in recs if b["prior"]["top"] and b[name]["top"]]
            entry["compared"] = len(pairs)
            entry["top_pick_changed_rate"] = (sum(1 for a, c in pairs if a != c) / len(pairs)) if pairs else None
        out["orderings"][name] = entry
    return out


def build_report(
    *,
    task,
    env,
    stack,
    systems: list[str],
    not_run: dict[str, str],
    loaded,
    names: list[str],
    fast: dict[str, dict],
    llm: dict[str, dict],
    sample: list | None,
    speed: dict[str, Any],
    impressions_sha256: str,
    catalog: dict[str, dict[str, Any]] | None = None,
    bids_available: bool = False,
    rank_by: str = "expected_value",
) -> dict[str, Any]:
    """report.json from a run's records: metrics over every impression (and over the LLM sample),
    revenue, exposure, calibration, candidate stage, LLM summary, position bias, rewrites, provenance,
    fusion, speed.

    `task` is the EvalTask, `env` the EvalEnv, `stack` the LLM stack (None without LLM systems),
    `loaded` the LoadedImpressions, `sample` the LLM sample (None when the LLM systems did not run),
    `catalog` ad id -> {advertiser, category, bid} (eval.exposure.read_catalog; None: no exposure),
    `bids_available` whether the catalog gives bids, `rank_by` the service's serving order (`served`)."""
    from eval.calibration import calibration
    from eval.provenance import fusion_provenance, fusion_separation, git_state, now_iso, runtime
    from eval.systems import LLM_SYSTEMS
    from kernel.settings import REPO_ROOT

    items = loaded.items
    order = [i.impression_id for i in items]
    llm_systems = {s for s in systems if s in LLM_SYSTEMS}
    agg = aggregate(order=order, fast=fast, llm=llm, systems=systems, llm_systems=llm_systems, names=names, boot=task.bootstrap)
    for s in not_run:
        agg["n"][s] = 0
    sample_ids = [i.impression_id for i in sample] if sample is not None else []
    llm_block = None
    if sample is not None:
        on_sample = [s for s in systems if s in (BASELINE, *LLM_SYSTEMS)]
        sub = aggregate(order=sample_ids, fast=fast, llm=llm, systems=on_sample, llm_systems=llm_systems, names=names, boot=task.bootstrap)
        llm_block = {
            "sample_size": len(sample),
            "sample_seed": task.llm.sample_seed,
            "sample_ids_head": sample_ids[:20],
            "sample_metrics": {"metrics": sub["metrics"], "ci": sub["ci"], "n": sub["n"]},
            "summary": llm_summary(llm, sample_ids),
            "cache": stack.llm.stats.to_dict(),
            "cache_entries": len(stack.llm.cache) if stack.llm.cache is not None else None,
        }
    fusion = env.services.fusion
    calib: dict[str, Any] = {}
    if BASELINE in systems:
        c = calibration(fast, order, system=BASELINE, pctr=fusion.pctr, boot=task.bootstrap)
        if c is not None:
            calib[BASELINE] = c
        if (fusion.calibration.get("prior_correction") or {}).get("log_odds_offset"):
            # pctr is prior-corrected to the catalog; a protocol with sampled negatives is also judged on the
            # sampled-row scale the calibration was fitted on (the correction undone), under its own name
            c = calibration(fast, order, system=BASELINE, pctr=fusion.sampled_pctr, boot=task.bootstrap)
            if c is not None:
                calib[SAMPLED_SCALE] = {**c, "note": "pCTR with the weights' prior correction undone (the scale of rows with sampled negatives)"}
    if llm_block is not None and "default+llm" in systems:
        c = calibration(llm, sample_ids, system="default+llm", pctr=fusion.pctr, boot=task.bootstrap)
        if c is not None:
            both = [i for i in sample_ids if i in llm and "scores" in llm[i]]
            same = calibration(fast, both, system=BASELINE, pctr=fusion.pctr, boot=task.bootstrap)
            if same is not None:
                c["default_on_same_impressions"] = {k: same[k] for k in ("impressions", "rows", "logloss", "logloss_ci", "ece")}
            calib["default+llm"] = c
    sample_or_none = sample_ids if sample is not None else None
    revenue = revenue_summary(
        order=order, sample_ids=sample_or_none, fast=fast, llm=llm, systems=[s for s in systems if s not in not_run],
        llm_systems=llm_systems, boot=task.bootstrap, available=bids_available, rank_by=rank_by,
    )  # fmt: skip
    exposure = None
    if catalog is not None:
        exposure = exposure_summary(
            order=order, sample_ids=sample_or_none, fast=fast, llm=llm, systems=systems, llm_systems=llm_systems, catalog=catalog
        )
    protocols: dict[str, int] = dict(Counter(i.protocol for i in items))
    weights = fusion_provenance(fusion)
    return {
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
                "sha256": weights["sha256"],
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
        "revenue": revenue,
        "exposure": exposure,
        "candidate_stage": candidate_stage(fast, order, task.protocol.recall_ks, task.bootstrap),
        "llm": llm_block,
        "position_bias": position_bias(llm, order) if llm_block else None,
        "calibration": calib or None,
        "rewrites": rewrite_summary(llm, sample_ids) if llm_block and task.llm.rewrite else None,
        "fusion": {
            "weights": weights,
            "separation": fusion_separation(fusion, loaded.users, impressions_sha256, task.data.limit),
        },
        "speed": speed,
        "repo_root": str(REPO_ROOT),
    }
