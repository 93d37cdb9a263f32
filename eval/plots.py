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
