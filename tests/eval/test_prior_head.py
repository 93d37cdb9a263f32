"""The eval fast path reads what the prior stage computed, in the cheapest shape that keeps its values: the head's
rounded priors as one matrix (PriorStage.head_priors: what every Candidate.priors holds), the history's vectors and
collaborative rows gathered once, the logged rows' sequence logits without a catalog-sized vector. Each shortcut
gives the bits the long way gives (demo catalog, real services)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from eval.baselines import LoggedView, prior_feature_logged
from eval.data import EvalImpression
from eval.rankers import FastRankers
from retrieval.features import FEATURES, build_profile, cf_profile, compute_features

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "impressions.jsonl"


def _impressions(n: int, catalog: list[str]) -> list[dict]:
    """The first n demo impressions with a history, each shown 15 catalog ads (its clicked ones among them)."""
    out = []
    with DEMO.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("history"):
                start = (7 * len(out)) % len(catalog)
                shown = [a for a in (catalog + catalog)[start : start + 15] if a not in rec["clicked"]][:14]
                out.append(rec | {"candidates": [*rec["clicked"], *shown]})
            if len(out) == n:
                break
    assert len(out) == n
    return out


def test_head_priors_hold_the_candidates_priors_and_rank_the_single_feature_baselines_the_same(demo_services):
    sel = demo_services.selector
    rankers = FastRankers(selector=sel, bm25=None, systems=["dense", "covisit", "popularity", "sequence"], use_chroma=False)
    for i, rec in enumerate(_impressions(8, list(sel.index.ids))):
        imp = EvalImpression(
            impression_id=f"i{i}", user_id=rec["user_id"], history=rec["history"], candidates=rankers.canonical(rec["candidates"]),
            clicked=frozenset(rec.get("clicked") or []), line=i,
        )  # fmt: skip
        stage = sel.prior_stage(rankers.request(imp))
        assert stage.head_priors is not None and stage.head_priors.shape == (len(stage.candidates), len(FEATURES))
        assert stage.head_priors.tolist() == [[c.priors[f] for f in FEATURES] for c in stage.candidates]
        ids = [c.ad.ad_id for c in stage.candidates]
        rows = [sel.index.row[a] for a in ids]
        view = LoggedView(imp=imp, stage=stage, ids=ids, rows=rows, tiebreak=rankers.res.tiebreak[rows])
        from_dicts = LoggedView(imp=imp, stage=replace(stage, head_priors=None), ids=ids, rows=rows, tiebreak=view.tiebreak)
        for feature in ("dense", "covisit", "popularity", "sequence", "cf"):
            rank = prior_feature_logged(feature)
            assert rank(rankers.res, view) == rank(rankers.res, from_dicts)


def test_canonical_order_keys_unknown_ids_like_known_ones(demo_services):
    rankers = FastRankers(selector=demo_services.selector, bm25=None, systems=["default"], use_chroma=False, seed=3)
    known = list(demo_services.index.ids[:12])
    keys = {a: int(k) for a, k in zip(demo_services.index.ids, rankers.res.tiebreak.tolist())}
    assert rankers.canonical(known[::-1]) == sorted(known, key=keys.__getitem__)
    mixed = rankers.canonical(["not-in-catalog", *known[:5]])
    assert sorted(mixed) == sorted(["not-in-catalog", *known[:5]]) and mixed == rankers.canonical(mixed[::-1])


def test_gathered_once_features_equal_the_gather_per_use(demo_services):
    sel, index = demo_services.selector, demo_services.index
    gen = sel.generator
    for rec in _impressions(10, list(index.ids)):
        hist, _ = index.rows(rec["history"])
        cands = np.asarray(index.rows(rec["candidates"])[0], dtype=np.int64)
        profile = build_profile(index, hist, decay=sel.recency_decay)
        assert profile.history_vectors is not None and profile.history_vectors.tobytes() == index.vectors[profile.rows].tobytes()
        bare = replace(profile, history_vectors=None)  # every feature gathers for itself
        seq = gen.sequence_scores(profile)
        long_way = compute_features(index, gen.behaviour, bare, cands, sequence=seq, cf_vector=cf_profile(gen.behaviour, bare))
        assert compute_features(index, gen.behaviour, profile, cands, sequence=seq).tobytes() == long_way.tobytes()
        if gen.sequence is not None:  # the logged rows' logits, once scattered into a catalog-sized vector
            full = np.zeros(gen.sequence.n_items, dtype=np.float32)
            full[cands] = gen.sequence.items[cands] @ gen.sequence.user_vector(profile.rows)
            long_way = compute_features(index, gen.behaviour, bare, cands, sequence=full, cf_vector=cf_profile(gen.behaviour, bare))
        assert gen.score_logged(profile, cands.tolist()).features.tobytes() == long_way.tobytes()
