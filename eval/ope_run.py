"""Off-policy evaluation and replay on the service's own traffic: the impression log joined with feedback.

Target variants are deterministic rankings recomputed from what each record logged (the prior features of
every scored candidate, their bids): a spec is one of
    logged                 the logging arm's own fused scores, without exploration (its greedy order)
    feature:<name>         one prior feature alone (feature:popularity, feature:covisit, ...), by relevance
    <path>.json            a fusion weights file (selection.fusion.FusionModel; its calibration gives pCTR)
optionally followed by `@relevance` or `@expected_value` (bid × pCTR, ties by score; the default is the
service's `rank_by`). The LLM's term cannot be replayed (its ranking is not logged): a weights file's
`llm_coef` is ignored, so evaluate LLM variants by serving them on an arm.

`materialise_log` writes canonical impressions (`impression_id, user_id, timestamp, history, candidates,
clicked`) from the log + feedback, so `adselect eval run --impressions FILE` replays them as it does the
public files.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eval.exposure import exposure
from eval.ope import ESTIMATORS, Target, evaluate_records
from kernel.errors import UserError
from retrieval.features import FEATURES
from selection.feedback import FeedbackStore
from selection.fusion import FusionModel
from selection.impression_log import LogReadStats, iter_log_records
from selection.pipeline import serving_order

log = logging.getLogger(__name__)
RankBy = Literal["relevance", "expected_value"]


def joined_records(log_dir: Path, feedback: Path, *, arm: str | None = None) -> tuple[list[dict[str, Any]], LogReadStats]:
    """Every whole log record (optionally of one arm), with clicked/conversions filled from the feedback store."""
    if not Path(log_dir).is_dir():
        raise UserError(f"--log {log_dir}: no such directory")
    if not Path(feedback).is_file():
        raise UserError(f"--feedback {feedback}: no such file")
    stats = LogReadStats()
    store = FeedbackStore(feedback)
    try:
        recs = [r for r in iter_log_records(log_dir, stats=stats) if arm is None or r.get("arm") == arm]
        return list(store.join(recs)), stats
    finally:
        store.close()


def _features(rec: Mapping[str, Any]) -> np.ndarray:
    return np.array([[float(s["priors"].get(f, 0.0)) for f in FEATURES] for s in rec.get("scored") or ()], dtype=np.float64).reshape(-1, len(FEATURES))


def _order(ids: Sequence[str], scores: np.ndarray, pctr: np.ndarray, bids: np.ndarray, rank_by: RankBy) -> list[str]:
    return [ids[int(i)] for i in serving_order(scores, pctr=pctr, bids=bids, rank_by=rank_by)]  # the endpoint's rule


def target_from_spec(spec: str, *, default_rank_by: RankBy = "expected_value") -> Target:
    """A deterministic target ranking from a spec (module docstring). Raises UserError for a bad spec."""
    base, _, rank = spec.partition("@")
    rank_by = rank or ("relevance" if base.startswith("feature:") else default_rank_by)
    if rank_by not in ("relevance", "expected_value"):
        raise UserError(f"target {spec!r}: rank by relevance or expected_value, not {rank_by!r}")
    fusion: FusionModel | None = None
    feature: int | None = None
    if base == "logged":
        pass
    elif base.startswith("feature:"):
        name = base.split(":", 1)[1]
        if name not in FEATURES:
            raise UserError(f"target {spec!r}: unknown feature {name!r}; known: {', '.join(FEATURES)}")
        feature = FEATURES.index(name)
    else:
        path = Path(base)
        if not path.is_file():
            raise UserError(f"target {spec!r}: no weights file {path}")
        try:
            fusion = FusionModel.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError) as e:
            raise UserError(f"target {spec!r}: invalid weights file ({e})") from None

    def target(rec: Mapping[str, Any]) -> list[str]:
        scored = rec.get("scored") or []
        ids = [s["ad_id"] for s in scored]
        bids = np.array([float(s.get("bid", 1.0)) for s in scored])
        if fusion is not None:
            scores = fusion.prior_scores(_features(rec))
            pctr = fusion.pctr(scores)
        else:
            pctr = np.array([float(s.get("pctr") or 0.0) for s in scored])
            scores = _features(rec)[:, feature] if feature is not None else np.array([float(s.get("score") or 0.0) for s in scored])
        return _order(ids, scores, pctr, bids, rank_by)  # type: ignore[arg-type]

    return target


def run_ope(
    *,
    log_dir: Path,
    feedback: Path,
    targets: Mapping[str, str],
    k: int = 1,
    reward: Literal["click", "revenue"] = "click",
    clip: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    arm: str | None = None,
    default_rank_by: RankBy = "expected_value",
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """report.json: per target variant `ips`, `snips`, `dr` ({value, ci}), `n`, `ess` (eval.ope); with a
    `catalog`, also each target's (and the logged policy's) exposure by advertiser and category and its coverage."""
    fns = {name: target_from_spec(spec, default_rank_by=default_rank_by) for name, spec in targets.items()}
    records, stats = joined_records(log_dir, feedback, arm=arm)
    if not records:
        raise UserError(f"--log {log_dir}: no impression-log records" + (f" of arm {arm!r}" if arm else ""))
    out: dict[str, Any] = {
        "log": {"dir": str(log_dir), "files": stats.files, "records": len(records), "torn": stats.torn, "arm": arm},
        "feedback": str(feedback),
        "options": {"k": k, "reward": reward, "clip": clip, "bootstrap": n_bootstrap, "seed": seed, "estimators": list(ESTIMATORS)},
        "logged": {
            "clicks": sum(len(r.get("clicked") or []) for r in records),
            "ctr": sum(len(set(r.get("clicked") or []) & set((r.get("served") or [])[:k])) for r in records) / len(records),
        },
        "targets": {},
    }
    for name, fn in fns.items():
        try:
            res = evaluate_records(records, target=fn, k=k, reward=reward, clip=clip, n_bootstrap=n_bootstrap, seed=seed)
        except ValueError as e:
            raise UserError(f"target {name!r}: {e}") from None
        out["targets"][name] = {"spec": targets[name], **res.to_json()}
        if catalog is not None:
            out["targets"][name]["exposure"] = exposure([fn(r)[:k] for r in records], catalog)
    if catalog is not None:
        out["logged"]["exposure"] = exposure([(r.get("served") or [])[:k] for r in records], catalog)
    return out


def materialise_log(log_dir: Path, feedback: Path, out: Path, *, arm: str | None = None) -> dict[str, int]:
    """Canonical impressions JSONL from the log + feedback (written to a temp file, renamed into place)."""
    records, stats = joined_records(log_dir, feedback, arm=arm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    clicked = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            canon = {
                "impression_id": r["impression_id"],
                "user_id": r["user_id"],
                "timestamp": r.get("timestamp"),
                "history": r.get("history") or [],
                "candidates": r.get("candidates") or [],
                "clicked": r.get("clicked") or [],
                "arm": r.get("arm"),
            }
            clicked += bool(canon["clicked"])
            fh.write(json.dumps(canon, separators=(",", ":")) + "\n")
    tmp.replace(out)
    return {"records": len(records), "with_click": clicked, "torn": stats.torn, "files": stats.files}
