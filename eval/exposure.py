"""Exposure: who a policy's impressions go to — by advertiser and by category — and how much of the catalog it uses.

For a list of served slates: each group's share of the served ads, the Gini coefficient of those shares over
*every* group of the catalog (a group never served counts as 0; 0 = perfectly even, → 1 = everything to one
group), and catalog coverage (distinct ads served / ads in the catalog). A change that starves advertisers or
categories shows as a higher Gini and a lower coverage before it ships.

`adselect eval run` reports it per system over each impression's top `SLATE_K` (the slate the endpoint
serves by default); `adselect eval ope` per target variant over its top k.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kernel.types import SelectRequest

SLATE_K: int = next(f.default for f in dataclasses.fields(SelectRequest) if f.name == "k")  # the endpoint's default k


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values (0 for an even split; (n-1)/n when one holds everything)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float((2 * (i * x).sum()) / (n * x.sum()) - (n + 1) / n)


def exposure(slates: Iterable[Sequence[str]], catalog: Mapping[str, Mapping[str, Any]], *, top: int = 10) -> dict[str, Any]:
    """`catalog`: ad id -> {"advertiser", "category"}. Shares (the `top` largest), Gini over all groups, coverage."""
    served: Counter = Counter()
    for s in slates:
        served.update(a for a in s if a in catalog)
    total = sum(served.values())
    out: dict[str, Any] = {"impressions": total, "coverage": len(served) / len(catalog) if catalog else 0.0}
    for key in ("advertiser", "category"):
        groups = Counter({str(meta.get(key) or ""): 0 for meta in catalog.values()})
        for ad, n in served.items():
            groups[str(catalog[ad].get(key) or "")] += n
        shares = {g: n / total for g, n in groups.most_common(top)} if total else {}
        out[f"by_{key}"] = {"groups": len(groups), "gini": gini(list(groups.values())), "top_shares": shares}
    return out


def read_catalog(path) -> dict[str, dict[str, Any]]:
    """ad id -> {advertiser, category, bid} from a canonical ads.jsonl (bid None when the line has none)."""
    import json

    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                ad = json.loads(line)
                out[ad["ad_id"]] = {"advertiser": ad.get("advertiser", ""), "category": ad.get("category", ""), "bid": ad.get("bid")}
    return out


def exposure_by_system(
    records: Mapping[str, Mapping[str, Any]], order: Sequence[str], systems: Iterable[str], catalog: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """system -> `exposure` of its top slates, one per impression of `order` whose record kept them (`top`)."""
    out: dict[str, dict[str, Any]] = {}
    for s in systems:
        slates = [records[i]["top"][s] for i in order if i in records and s in (records[i].get("top") or {})]
        if slates:
            out[s] = exposure(slates, catalog) | {"slates": len(slates), "k": SLATE_K}
    return out
