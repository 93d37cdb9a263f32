"""report.md: the numbers of report.json as tables (means with 95% bootstrap CIs, paired differences vs
default, revenue, exposure, candidate stage, LLM, calibration, rewrites, position bias, fusion weights,
speed, data)."""
from __future__ import annotations

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
    out += _revenue_md(report.get("revenue"))
    out += _exposure_md(report.get("exposure"))
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
        "## Calibration (pCTR = the weights' calibration of the fused score; every candidate of every logged impression)",
        "",
        "| system | impressions | rows | base rate | mean pCTR | log loss [95% CI] | log loss of the base rate | NE | Σp/Σy | ECE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, c in cal.items():
        lo, hi = c["logloss_ci"]
        out.append(
            f"| {s} | {c['impressions']} | {c['rows']} | {_fmt(c['base_rate'])} | {_fmt(c['mean_predicted'])} | "
            f"{_fmt(c['logloss'])} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(c['logloss_base_rate'])} | {_fmt(c.get('normalized_entropy'))} | "
            f"{_fmt(c.get('sum_p_over_sum_y'))} | {_fmt(c['ece'])} |"
        )
    for s, c in cal.items():
        same = c.get("default_on_same_impressions")
        if same:
            lo, hi = same["logloss_ci"]
            out += ["", f"`default` on the same {same['impressions']} impressions as `{s}`: log loss {_fmt(same['logloss'])} [{_fmt(lo)}, {_fmt(hi)}], ECE {_fmt(same['ece'])}."]
    systems = list(cal)
    n_bins = max(len(c["reliability"]) for c in cal.values())
    out += ["", f"Reliability (bins of predicted pCTR): {n_bins} equal-count (quantile) bins per system, lowest first; ECE is over these bins.", ""]
    out += ["| bin | " + " | ".join(f"{s}: n | {s}: pCTR range | {s}: predicted | {s}: observed" for s in systems) + " |"]
    out += ["|---|" + "---:|---:|---:|---:|" * len(systems)]
    for i in range(n_bins):
        cells = []
        for s in systems:
            rel = cal[s]["reliability"]
            b = rel[i] if i < len(rel) else None
            cells.append(f"{b['n']} | {b['lo']:.4f}–{b['hi']:.4f} | {b['predicted']:.4f} | {b['observed']:.4f}" if b else "0 | — | — | —")
        out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
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


def _revenue_md(rev: dict | None) -> list[str]:
    if not rev:
        return []
    rule = "bid × pCTR" if rev["served_rank_by"] == "expected_value" else f"rank_by={rev['served_rank_by']}"
    out = [f"## Revenue (each system's top k; `served` is the order the endpoint serves: {rule})", ""]
    if not rev["available"]:
        return out + [f"Not reported: {rev['reason']}.", ""]
    names = rev["metric_names"]
    out += [f"{rev['definition']}; mean [95% bootstrap CI] over impressions.", ""]
    out += _table(rev, list(rev["metrics"]), names)
    if rev.get("paired_vs_default"):
        out += ["", "Paired difference vs default (diff [95% CI], n):", ""]
        out += ["| system | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for sys_name, per in rev["paired_vs_default"].items():
            cells = [
                "—" if per[m]["diff"] is None else f"{per[m]['diff']:+.4f} [{per[m]['lo']:+.4f}, {per[m]['hi']:+.4f}] n={per[m]['n']}" for m in names
            ]
            out.append(f"| {sys_name} | " + " | ".join(cells) + " |")
    sample = rev.get("sample_metrics")
    if sample:
        out += ["", "Same LLM sample, side by side:", ""]
        out += _table(sample, list(sample["metrics"]), names)
    out.append("")
    return out


def _exposure_md(exp: dict | None) -> list[str]:
    if not exp or not exp.get("systems"):
        return []
    out = [
        f"## Exposure (each system's top {exp['k']} per impression; Gini over every group of the catalog, 0 = even; "
        f"coverage = distinct ads served / {exp['catalog_ads']} in the catalog)",
        "",
        "| system | slates | coverage | advertisers | advertiser Gini | top advertiser (share) | categories | category Gini | top category (share) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]

    def top(block: dict) -> str:
        shares = block["top_shares"]
        if not shares:
            return "—"
        g, v = next(iter(shares.items()))
        return f"{g or '(none)'} ({v:.3f})"

    rows = list(exp["systems"].items()) + [(f"{k} (LLM sample)", v) for k, v in (exp.get("sample") or {}).items()]
    for name, e in rows:
        a, c = e["by_advertiser"], e["by_category"]
        out.append(
            f"| {name} | {e['slates']} | {e['coverage']:.4f} | {a['groups']} | {a['gini']:.4f} | {top(a)} | "
            f"{c['groups']} | {c['gini']:.4f} | {top(c)} |"
        )
    one = [key for key in ("advertiser", "category") if all(e[f"by_{key}"]["groups"] <= 1 for e in exp["systems"].values())]
    if one:
        out += ["", f"The catalog names no {' and no '.join(one)} (one group): its Gini is 0 by construction."]
    out.append("")
    return out
