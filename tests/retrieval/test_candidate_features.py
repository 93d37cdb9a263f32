"""Candidate generation computes each per-user quantity once and hands it on: the features of the rows it
returns are bit for bit those compute_features() computes on its own, and the collaborative profile it
passes in (`cf_vector`) is the one compute_features() would compute."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from retrieval.features import build_profile, cf_profile, compute_features, covisit_mix

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "impressions.jsonl"


def _histories(n: int) -> list[list[str]]:
    out = []
    with DEMO.open(encoding="utf-8") as fh:
        for line in fh:
            h = json.loads(line).get("history") or []
            if h:
                out.append(h)
            if len(out) == n:
                break
    return out


def test_generated_features_equal_compute_features(demo_services):
    gen, index = demo_services.selector.generator, demo_services.index
    for hist in _histories(12):
        rows, _ = index.rows(hist)
        profile = build_profile(index, rows, decay=0.8)
        cset = gen.generate(profile, exclude=set(rows))
        assert len(np.intersect1d(cset.rows, np.asarray(rows))) == 0  # the history is excluded
        seq = gen.sequence_scores(profile)
        alone = compute_features(index, gen.behaviour, profile, cset.rows, sequence=seq)
        assert alone.tobytes() == cset.features.tobytes()
        given = compute_features(
            index, gen.behaviour, profile, cset.rows, covisit=covisit_mix(gen.behaviour, profile), sequence=seq,
            cf_vector=cf_profile(gen.behaviour, profile),
        )  # fmt: skip
        assert given.tobytes() == alone.tobytes()
