"""PNG plots for a report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ndcg(report: dict, path: Path) -> Path | None:
    """Grouped bars: nDCG@k per system, with 95% CI error bars."""
    ks = [m for m in ("ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20") if m in report["metric_names"]]
    systems = [s for s in report["metrics"] if any(report["metrics"][s].get(m) is not None for m in ks)]
    if not systems:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(systems) + 2), 4))
    width = 0.8 / len(ks)
    for j, m in enumerate(ks):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(systems):
            v = report["metrics"][s].get(m)
            if v is None:
                continue
            c = report["ci"][s][m]
            xs.append(i + (j - (len(ks) - 1) / 2) * width)
            ys.append(v)
            lo.append(v - c[0])
            hi.append(c[1] - v)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=m)
    ax.set_xticks(range(len(systems)), systems, rotation=20)
    ax.set_ylabel("nDCG (mean, 95% CI)")
    ax.set_title(f"{report['config'].get('name', '')}: nDCG@k per system (n={report['n_impressions']})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_position_bias(report: dict, path: Path) -> Path | None:
    """Left: how often the top pick changes when the same candidates are reordered.
    Right: where in the presented list the LLM's top pick sat, per ordering."""
    pb = report.get("position_bias")
    if not pb:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in ("reversed", "shuffled") if n in pb["orderings"]]
    rates = [pb["orderings"][n].get("top_pick_changed_rate") or 0.0 for n in names]
    a1.bar(names, rates, color=["tab:orange", "tab:green"][: len(names)])
    a1.set_ylim(0, 1)
    a1.set_ylabel("top pick changed (fraction)")
    a1.set_title(f"LLM top pick vs prior order (n={pb['impressions']})")
    for name in ("prior", "reversed", "shuffled"):
        e = pb["orderings"].get(name)
        if not e or not e["top_pick_positions"]:
            continue
        pos = {int(k): v for k, v in e["top_pick_positions"].items()}
        xs = sorted(pos)
        total = sum(pos.values())
        a2.plot(xs, [pos[x] / total for x in xs], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    a2.set_xlabel("position of the top pick in the presented list (0 = first)")
    a2.set_ylabel("fraction of answers")
    a2.set_title("Where the LLM's top pick was presented")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(report: dict, path: Path) -> Path | None:
    """Top: mean predicted pCTR vs observed click rate per bin, per system, with the diagonal.
    Bottom: rows per bin (log scale)."""
    cal = report.get("calibration")
    if not cal:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    a1.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    width = 0.08 / len(cal)
    for j, (system, c) in enumerate(cal.items()):
        bins = c["reliability"]
        pred = [b["predicted"] for b in bins]
        obs = [b["observed"] for b in bins]
        a1.plot(pred, obs, marker="o", label=f"{system}: log loss {c['logloss']:.4f} (predicting the base rate: {c['logloss_base_rate']:.4f}), {c['rows']} rows")
        centres = [(b["lo"] + b["hi"]) / 2 + (j - (len(cal) - 1) / 2) * width for b in bins]
        a2.bar(centres, [b["n"] for b in bins], width=width, label=system)
    a1.set_xlim(0, 1)
    a1.set_ylim(0, 1)
    a1.set_ylabel("observed click rate")
    a1.set_title(f"{report['config'].get('name', '')}: pCTR reliability")
    a1.legend(fontsize=7, loc="upper left")
    a1.grid(alpha=0.3)
    a2.set_yscale("log")
    a2.set_xlabel("predicted pCTR (bin mean above; bin centre below)")
    a2.set_ylabel("rows")
    a2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
