"""`adselect eval sample-logged`: logged-candidate impressions made from full-catalog ones (the clicked
ad + `n_random` random catalog ads), for users kept out of the eval sets.

The Games dev data logs no shown-but-not-clicked ads: `impressions_sampled_dev.jsonl` pairs each click
with 19 random products. This builds the same kind of file for other users, e.g. training users for the
LLM run whose results fit the LLM's fusion weight (`adselect eval tune --llm-run DIR`):

    adselect eval sample-logged --ads ../shared/data/amazon_games_6k/ads.jsonl \\
      --impressions ../shared/data/amazon_games_6k/impressions_full_dev.jsonl \\
      --exclude ../shared/data/amazon_games_6k/impressions_sampled_dev.jsonl --exclude-task games_full \\
      --skip 27703 --n 40 --out var/llm_train/impressions.jsonl

Eligible: full-catalog impressions (no logged candidates) after the first `skip` records (e.g. the prior
weights' `meta.train_lines_read`, so the LLM weight is not fitted on the rows the prior was), whose user
is in no `--exclude` file or `--exclude-task`, with a history and a click in the catalog. `n` of them are
drawn uniformly; each gets `n_random` negatives drawn uniformly from the catalog minus the user's history
and clicks; candidates are shuffled. One seed drives all three draws. The output is canonical impression
JSONL (impression ids kept) plus `<name>.meta.json`: sources with sha256, options, counts and the command.
Write it outside the repository (under var/).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.provenance import excluded_users, exclusion_sources, file_ref, rel_path
from retrieval.records import ImpressionRecord, iter_impressions, read_ads


@dataclass
class SampleOptions:
    ads: Path
    impressions: Path
    out: Path
    exclude: list[Path] = field(default_factory=list)
    exclude_tasks: list[str] = field(default_factory=list)
    n: int = 40
    n_random: int = 19
    skip: int = 0
    seed: int = 0

    def command(self) -> str:
        parts = ["adselect", "eval", "sample-logged", "--ads", rel_path(self.ads), "--impressions", rel_path(self.impressions)]
        for p in self.exclude:
            parts += ["--exclude", rel_path(p)]
        for t in self.exclude_tasks:
            parts += ["--exclude-task", t]
        parts += ["--skip", str(self.skip), "--n", str(self.n), "--n-random", str(self.n_random), "--seed", str(self.seed)]
        parts += ["--out", rel_path(self.out)]
        return shlex.join(parts)


def sampled_candidates(*, clicked: Sequence[str], history: Sequence[str], catalog: Sequence[str], n_random: int, rng: np.random.Generator) -> list[str]:
    """The sampled protocol's candidate list: the clicked ads + `n_random` distinct ads drawn uniformly from
    `catalog` minus the history and the clicks, shuffled (the one implementation: sample-logged and the
    traffic simulation's full-dev users, eval.ope_sim.sampled_users)."""
    taken = set(history) | set(clicked)
    draw = rng.choice(len(catalog), size=min(len(catalog), n_random + len(taken)), replace=False)
    negatives = [catalog[r] for r in draw.tolist() if catalog[r] not in taken][:n_random]
    candidates = list(clicked) + negatives
    rng.shuffle(candidates)
    return candidates


def meta_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).stem + ".meta.json")


def sample_logged(opts: SampleOptions) -> dict[str, Any]:
    """Write opts.out (and its meta file); returns the meta."""
    ids = [a.ad_id for a in read_ads(opts.ads)]
    known = set(ids)
    sources = exclusion_sources(files=opts.exclude, tasks=opts.exclude_tasks)
    users = excluded_users(sources)
    counts = {"read": 0, "skipped_head": 0, "excluded_user": 0, "has_candidates": 0, "not_in_catalog": 0}
    eligible: list[tuple[ImpressionRecord, list[str], list[str]]] = []
    for _, rec in iter_impressions(opts.impressions):
        counts["read"] += 1
        if counts["read"] <= opts.skip:
            counts["skipped_head"] += 1
            continue
        if rec.user_id in users:
            counts["excluded_user"] += 1
            continue
        if rec.candidates:
            counts["has_candidates"] += 1
            continue
        clicked = [c for c in dict.fromkeys(rec.clicked) if c in known]
        history = [h for h in rec.history if h in known]
        if not clicked or not history:
            counts["not_in_catalog"] += 1
            continue
        eligible.append((rec, history, clicked))
    if not eligible:
        raise ValueError(f"{opts.impressions}: no eligible impression (counts: {counts})")

    rng = np.random.default_rng(opts.seed)
    pick = np.sort(rng.choice(len(eligible), size=min(opts.n, len(eligible)), replace=False))
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    with Path(opts.out).open("w", encoding="utf-8") as fh:
        for i in pick.tolist():
            rec, history, clicked = eligible[i]
            candidates = sampled_candidates(clicked=clicked, history=history, catalog=ids, n_random=opts.n_random, rng=rng)
            line = {"impression_id": rec.impression_id, "user_id": rec.user_id, "history": history, "candidates": candidates, "clicked": clicked}
            if rec.timestamp is not None:
                line["timestamp"] = rec.timestamp
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    meta = {
        "command": opts.command(),
        "source": file_ref(opts.impressions),
        "ads": file_ref(opts.ads),
        "exclude": sources,
        "excluded_users": len(users),
        "options": {"n": opts.n, "n_random": opts.n_random, "skip": opts.skip, "seed": opts.seed},
        "counts": {**counts, "eligible": len(eligible), "written": len(pick)},
        "out": file_ref(opts.out),
    }
    meta_path(opts.out).write_text(json.dumps(meta, indent=2))
    return meta
