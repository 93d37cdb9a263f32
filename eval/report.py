"""From per-impression results to report.json's numbers and report.md's tables.

Every number is a mean over impressions with a 95% percentile-bootstrap interval (eval.metrics);
each system is compared with `default` on the same impressions (paired bootstrap of differences).
Metrics that do not apply to a protocol (recall@K on logged candidates) are null, and every
requested system appears, with null metrics when it was not run.

Calibration (logged candidates): the pCTR the endpoint attaches to each ad (Platt scaling of the
fused score, `FusionModel.pctr`) against the clicks, pooled over every candidate of every impression:
log loss (CI by resampling impressions), the log loss of always predicting the observed base rate,
and reliability bins (eval.tune.reliability). Rewrites: per LLM impression with `llm.rewrite` on,
whether the top ad was served with rewritten copy, and the share of impressions with each refusal reason.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from eval.config import BootstrapSpec
from eval.metrics import mean_with_ci, paired_diff
from eval.systems import BASELINE
from eval.tune import reliability

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


PCTR_EPS = 1e-12  # log loss clips pCTR to [eps, 1 - eps]


def _binary_logloss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, PCTR_EPS, 1 - PCTR_EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _entropy(base: float) -> float:
    """Log loss of predicting `base` for rows whose click rate is `base`."""
    if base <= 0.0 or base >= 1.0:
        return 0.0
    return -(base * math.log(base) + (1 - base) * math.log(1 - base))


def calibration(
    records: dict[str, dict],
    order: list[str],
    *,
    system: str,
    pctr: Callable[[np.ndarray], np.ndarray],
    boot: BootstrapSpec,
    bins: int = 10,
) -> dict[str, Any] | None:
    """Calibration of `system`'s pCTR over the impressions of `order`: `pctr` (FusionModel.pctr) of the
    fused scores kept in `records[id]["scores"][system]`, labelled by `records[id]["scores"]["clicked_at"]`.

    Rows are pooled (every candidate of every impression); the log-loss interval resamples impressions.
    `logloss_base_rate` is the log loss of predicting the observed base rate for every row (the
    no-skill reference); `ece` is the count-weighted mean |predicted − observed| over the bins."""
    ss, ys = [], []
    for iid in order:
        rec = records.get(iid)
        c = rec.get("scores") if rec is not None else None
        if c and c.get(system):
            y = [0.0] * len(c[system])
            for k in c["clicked_at"]:
                y[k] = 1.0
            ss.append(c[system])
            ys.append(y)
    if not ss:
        return None
    sizes = np.array([len(x) for x in ss])
    p = pctr(np.fromiter((v for x in ss for v in x), dtype=np.float64, count=int(sizes.sum())))
    y = np.fromiter((v for x in ys for v in x), dtype=np.float64, count=int(sizes.sum()))
    loss = _binary_logloss(p, y)
    base = float(y.mean())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    per_imp = np.add.reduceat(loss, starts)
    rng = np.random.default_rng(boot.seed)
    boots = np.empty(boot.n_boot)
    for lo in range(0, boot.n_boot, 100):  # resample impressions, 100 replicates at a time
        idx = rng.integers(0, len(sizes), size=(min(100, boot.n_boot - lo), len(sizes)))
        boots[lo : lo + len(idx)] = per_imp[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    tail = (1 - boot.level) / 2
    rel = reliability(p, y, bins=bins)
    return {
        "impressions": len(sizes),
        "rows": int(len(y)),
        "base_rate": base,
        "mean_predicted": float(p.mean()),
        "logloss": float(loss.mean()),
        "logloss_ci": [float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))],
        "logloss_base_rate": _entropy(base),
        "ece": float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in rel) / len(y)),
        "reliability": rel,
    }


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


# ---- markdown ---------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cell(report: dict, s: str, m: str) -> str:
    v = report["metrics"][s].get(m)
    c = report["ci"].get(s, {}).get(m)
    if v is None:
        return "—"
    return f"{v:.4f} [{c[0]:.4f}, {c[1]:.4f}]" if c else f"{v:.4f}"


def _table(report: dict, systems: list[str], names: list[str]) -> list[str]:
    lines = ["| system | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for s in systems:
        lines.append(f"| {s} | {report['n'].get(s, 0)} | " + " | ".join(_cell(report, s, m) for m in names) + " |")
    return lines


def render_markdown(report: dict) -> str:
    systems = list(report["metrics"])
    names = [m for m in report["metric_names"] if any(report["metrics"][s].get(m) is not None for s in systems)]
    cfg, prov = report["config"], report["provenance"]
    out = [f"# Eval report: {cfg.get('name', '')}", ""]
    if cfg.get("description"):
        out += [cfg["description"].strip(), ""]
    out += [
        f"- impressions evaluated: **{report['n_impressions']}** of {report['n_read']} read "
        f"(protocols: {', '.join(f'{k}: {v}' for k, v in report['protocols'].items())})",
        f"- skipped: {', '.join(f'{k}: {v}' for k, v in report['skipped'].items() if v) or 'none'}",
        f"- git commit `{prov['git']['commit']}`{' (dirty tree)' if prov['git']['dirty'] else ''}; "
        f"config sha256 `{prov['config_sha256'][:16]}`",
        "",
        "## Metrics (mean [95% bootstrap CI])",
        "",
        *_table(report, systems, names),
        "",
    ]
    not_run = report.get("not_run") or {}
    if not_run:
        out += [f"Not run: {', '.join(f'{s} ({why})' for s, why in not_run.items())}.", ""]
    if report["paired_vs_default"]:
        key = [m for m in ("auc", "mrr", "ndcg@5", "ndcg@10", "hit@10", "recall@50") if m in names]
        out += ["## Paired difference vs default (same impressions; diff [95% CI], n)", ""]
        out += ["| system | " + " | ".join(key) + " |", "|---|" + "---:|" * len(key)]
        for s, per in report["paired_vs_default"].items():
            cells = []
            for m in key:
                d = per[m]
                cells.append("—" if d["diff"] is None else f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] n={d['n']}")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
    cs = report.get("candidate_stage")
    if cs:
        ks = [k for k in cs if k.startswith("recall@") and not k.endswith("_ci")]
        out += ["## Candidate stage (full catalog, default's candidates by prior score)", ""]
        out += ["| n | " + " | ".join(ks) + " | coverage | mean candidates |", "|---:|" + "---:|" * (len(ks) + 2)]
        out.append(
            f"| {cs['n']} | " + " | ".join(f"{_fmt(cs[k])} [{_fmt(cs[k + '_ci'][0])}, {_fmt(cs[k + '_ci'][1])}]" for k in ks)
            + f" | {_fmt(cs['coverage'])} | {cs['mean_candidates']:.1f} |"
        )
        out.append("")
    llm = report.get("llm")
    if llm:
        out += ["## LLM", ""]
        out += [
            f"- sample: {llm['sample_size']} impressions (seed {llm['sample_seed']}); model `{prov.get('model')}`; "
            f"prompt `{(prov.get('prompt') or {}).get('name')}` v{(prov.get('prompt') or {}).get('version')} "
            f"sha256 `{((prov.get('prompt') or {}).get('sha256') or '')[:16]}`",
            f"- decoding: {prov.get('decoding')}",
            f"- answered: {llm['summary']['llm_used']} / {llm['summary']['impressions']}; degraded: {llm['summary']['degraded'] or 'none'}",
            f"- cache (this run): {llm['cache']}",
            f"- latency ms: {llm['summary']['latency_ms']}",
        ]
        sample = llm.get("sample_metrics")
        if sample:
            out += ["", "Same sample, side by side:", ""]
            sub = {"metrics": sample["metrics"], "ci": sample["ci"], "n": sample["n"]}
            out += _table(sub, list(sample["metrics"]), names)
        out.append("")
    cal = report.get("calibration")
    if cal:
        out += _calibration_md(cal)
    rw = report.get("rewrites")
    if rw:
        out += _rewrites_md(rw)
    pb = report.get("position_bias")
    if pb:
        out += ["## LLM position bias", "", "| ordering | answered | top pick first | mean position of top pick | top pick changed vs prior order |", "|---|---:|---:|---:|---:|"]
        for name, e in pb["orderings"].items():
            out.append(
                f"| {name} | {e['answered']} | {_fmt(e['top_pick_first_rate'], 3)} | {_fmt(e['mean_top_pick_position'], 2)} | "
                f"{_fmt(e.get('top_pick_changed_rate'), 3) if name != 'prior' else '—'} |"
            )
        out.append("")
    fs = report["fusion"]
    out += [
        "## Fusion weights",
        "",
        f"- file: `{fs['weights'].get('path')}` sha256 `{(fs['weights'].get('sha256') or '')[:16]}` (source: {fs['weights'].get('source')})",
        f"- fitted on: {fs['separation'].get('weights_train')}; excluded: {fs['separation'].get('weights_exclude')}",
        f"- separation from the evaluated users: **{fs['separation']['status']}**"
        + (f" (overlap users: {fs['separation']['overlap_users']})" if fs["separation"].get("overlap_users") is not None else "")
        + (f" — {fs['separation']['note']}" if fs["separation"].get("note") else ""),
        "",
        "## Speed",
        "",
    ]
    for phase, sp in report["speed"].items():
        out.append(f"- {phase}: {sp}")
    out += ["", "## Data", ""]
    for k, v in prov["data"].items():
        out.append(f"- {k}: {v}")
    out += ["", f"Plots: {', '.join(report.get('plots', [])) or 'none'}", ""]
    return "\n".join(out)


def _calibration_md(cal: dict) -> list[str]:
    out = [
        "## Calibration (pCTR = Platt scaling of the fused score; every candidate of every logged impression)",
        "",
        "| system | impressions | rows | base rate | mean pCTR | log loss [95% CI] | log loss of the base rate | ECE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, c in cal.items():
        lo, hi = c["logloss_ci"]
        out.append(
            f"| {s} | {c['impressions']} | {c['rows']} | {_fmt(c['base_rate'])} | {_fmt(c['mean_predicted'])} | "
            f"{_fmt(c['logloss'])} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(c['logloss_base_rate'])} | {_fmt(c['ece'])} |"
        )
    for s, c in cal.items():
        same = c.get("default_on_same_impressions")
        if same:
            lo, hi = same["logloss_ci"]
            out += ["", f"`default` on the same {same['impressions']} impressions as `{s}`: log loss {_fmt(same['logloss'])} [{_fmt(lo)}, {_fmt(hi)}], ECE {_fmt(same['ece'])}."]
    out += ["", "Reliability (bins of predicted pCTR):", ""]
    systems = list(cal)
    out += ["| bin | " + " | ".join(f"{s}: n | {s}: predicted | {s}: observed" for s in systems) + " |"]
    out += ["|---|" + "---:|---:|---:|" * len(systems)]
    edges = sorted({(b["lo"], b["hi"]) for c in cal.values() for b in c["reliability"]})
    for lo, hi in edges:
        cells = []
        for s in systems:
            b = next((b for b in cal[s]["reliability"] if b["lo"] == lo), None)
            cells.append(f"{b['n']} | {b['predicted']:.4f} | {b['observed']:.4f}" if b else "0 | — | —")
        out.append(f"| [{lo:.1f}, {hi:.1f}) | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _rewrites_md(rw: dict) -> list[str]:
    out = [
        "## Rewrites (LLM impressions with rewrite on)",
        "",
        f"- requested: {rw['requested']}; LLM answered: {rw['answered']}",
        f"- served on the top ad: **{rw['served']}** ({_fmt(rw['share_served'], 3)}); passed, on any ad: "
        f"{rw['copy_ok']} ({_fmt(rw['share_copy_ok'], 3)})",
        f"- copy discarded before validation (missing, empty, too long, or for a dropped id): {rw['copy_discarded']}",
        f"- impressions with any refusal: {_fmt(rw['any_violation'], 3)}",
        "",
    ]
    if rw["violations"]:
        out += ["| reason | impressions | rate |", "|---|---:|---:|"]
        out += [f"| {k} | {rw['violation_counts'][k]} | {_fmt(v, 3)} |" for k, v in rw["violations"].items()]
        out.append("")
    return out
