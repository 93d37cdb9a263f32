"""Scoring mode's LLM weight (`llm_score_coef`) for `adselect eval tune --llm-mode score`.

Each training impression (users of the exclusion kept out, a history and a click in the catalog, in
input order, at most `max_impressions`) goes through the Selector's prior stage with the weights just
fitted, so the candidates are the ones serving would send (the first `n_candidates` by prior, in prior
order); the service's scorer (selection.services.make_scorer: its prompt, P permutations, top logprobs)
scores them. Per sent candidate that gives a row: the prior score, the averaged label log-probability
(`CandidateScores.logprob`, the term serving adds as `llm_score_coef × logprob`), the clicked label, and
the shown-position control.

The control is the LLM term a model that looks only at positions would give the row: the model's mean
log-probability at each shown position (over every scored impression and permutation: its position
profile), averaged over the positions the candidate was shown at. For a model that echoes the order it is
shown it equals the LLM term itself (the fit cannot credit the LLM: `confounded`), and it takes out what
the position explains for any other model. Neither the raw mean position (`CandidateScores.position`:
with P=2, an order and its reverse, it is (n-1)/2 for every candidate, while a model that favours the
first label shown lifts both ends) nor 1/(1+position) (listwise's transform: a first-label preference
averaged over two orders is not a function of it, and part of it was credited to the LLM on synthetic
echo data) controls for that. The rows go to eval.tune.fit_llm_term, which decides what ships exactly
as for listwise.

An impression whose every permutation failed is counted by reason and left out (never a silent zero).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kernel.errors import LLMOutputInvalid, LLMUnavailable
from kernel.types import SelectRequest
from retrieval.records import ImpressionRecord

log = logging.getLogger(__name__)


@dataclass
class ScoreRows:
    """Scoring-mode fitting rows: one per candidate sent, grouped by impression."""

    prior: np.ndarray
    logprob: np.ndarray  # averaged normalised label log-probability
    position: np.ndarray  # the position control (position_control)
    y: np.ndarray
    groups: np.ndarray
    impressions: int
    record: dict[str, Any] = field(default_factory=dict)  # counts for the weights' meta


def position_control(by_order: list[list[tuple[int, float]]], n_shown: list[int]) -> tuple[np.ndarray, dict[str, float]]:
    """Per row, the LLM term of a position-only model, and that model (the position profile).

    `by_order[r]`: row r's (position shown, log-probability) per answered permutation
    (CandidateScores.by_order); `n_shown[r]`: how many candidates its impression showed. The profile is
    the mean log-probability at each (n, position) over all rows and permutations; a row's control is the
    mean of the profile over the positions it was shown at."""
    sums: dict[tuple[int, int], list[float]] = {}
    for shown, n in zip(by_order, n_shown, strict=True):
        for p, lp in shown:
            sums.setdefault((n, p), []).append(lp)
    profile = {key: float(np.mean(v)) for key, v in sums.items()}
    control = np.array([np.mean([profile[(n, p)] for p, _ in shown]) for shown, n in zip(by_order, n_shown, strict=True)])
    return control, {f"{n}:{p}": round(v, 4) for (n, p), v in sorted(profile.items())}


async def score_rows(
    records: Iterable[ImpressionRecord],
    *,
    selector,
    scorer,
    n_candidates: int,
    max_impressions: int,
    exclude_users: set[str],
    timeout_s: float,
    progress=None,
) -> ScoreRows:
    """The rows of the first `max_impressions` usable records (see the module doc). `selector` carries the
    fitted fusion weights (its prior stage orders the candidates); `scorer` is an agent.scorer.LLMScorer."""
    sel = replace(selector, llm_max_candidates=n_candidates)
    priors, lps, shown, n_shown, ys, groups = [], [], [], [], [], []
    counts = {"read": 0, "excluded": 0, "skipped": 0, "scored": 0, "failed": 0, "click_in_sent": 0}
    failures: dict[str, int] = {}
    partial = missing = calls = 0
    for rec in records:
        if counts["scored"] >= max_impressions:
            break
        counts["read"] += 1
        if rec.user_id in exclude_users:
            counts["excluded"] += 1
            continue
        clicked = set(rec.clicked)
        if not rec.history or not clicked:
            counts["skipped"] += 1
            continue
        req = SelectRequest(
            user_id=rec.user_id, history=list(rec.history), candidates=list(rec.candidates) or None,
            k=n_candidates, use_llm=False, rewrite=False, request_id=rec.impression_id,
        )  # fmt: skip
        stage = await asyncio.to_thread(sel.prior_stage, req)
        sent = stage.candidates[:n_candidates]
        if not stage.history_ads or not clicked or len(sent) < 2:
            counts["skipped"] += 1
            continue
        try:
            res = await scorer.ascore(
                history_ads=stage.history_ads, events=[], candidates=sent, timeout_s=timeout_s, seed_key=rec.impression_id
            )
        except (LLMUnavailable, LLMOutputInvalid) as e:  # every permutation failed: counted, left out
            counts["failed"] += 1
            failures[e.reason] = failures.get(e.reason, 0) + 1
            continue
        finally:
            if progress is not None:
                progress.update(1)
        n = len(res.candidate_ids)
        g = counts["scored"]
        counts["scored"] += 1
        counts["click_in_sent"] += any(c.ad.ad_id in clicked for c in sent[:n])
        partial += res.answered < res.permutations
        missing += res.missing_labels
        calls += res.permutations
        for c in sent[:n]:
            a = c.ad.ad_id
            priors.append(c.prior_score)
            lps.append(res.logprob[a])
            shown.append(res.by_order[a])
            n_shown.append(n)
            ys.append(1.0 if a in clicked else 0.0)
            groups.append(g)
    position, profile = position_control(shown, n_shown)
    record = {
        **counts,
        "failures": failures,
        "partially_answered": partial,
        "missing_labels": missing,
        "calls": calls,
        "permutations": scorer.permutations,
        "n_candidates": n_candidates,
        "prompt": scorer.prompt_info,
        "model": scorer.model,
        "llm_feature": "averaged normalised label log-probability (agent.scorer CandidateScores.logprob)",
        "position_feature": "the position-only LLM term: the mean log-probability at each shown position (the profile "
        "below, 'n:position'), averaged over the positions the candidate was shown at",
        "position_profile": profile,
    }
    log.info("scoring-mode rows", extra=record)
    return ScoreRows(
        np.array(priors), np.array(lps), position, np.array(ys), np.array(groups, dtype=np.int64), counts["scored"], record,
    )  # fmt: skip
