"""Scoring mode's LLM weight (`llm_score_coef`) for `adselect eval tune --llm-mode score`.

Each training impression (users of the exclusion kept out, a history and a click in the catalog, in
input order, at most `max_impressions`) goes through the Selector's prior stage with the weights just
fitted, so the candidates are the ones serving would send (the first `n_candidates` by prior); the
service's scorer (selection.services.make_scorer: its prompt, P shown orders from agent.scorer.permutations,
top logprobs) scores them. Per sent candidate and answered shown order that gives a row: the prior score,
the candidate's normalised label log-probability in that order, the shown-position control, and the click.

Why per shown order: serving adds `llm_score_coef × mean over orders of the log-probability`; a linear
logit a·prior + b·logprob_k + c·control_k per order averages to a·prior + b·(the served term) + c·(mean
control), so b/a is the served weight. The control is the LLM term a model that looks only at positions
would give the row: the model's mean log-probability at that shown position (over every scored impression
and order: its position profile). Averaged over a candidate's orders it would be a constant under the
balanced design (P = n: every candidate at every position once), which is exactly the point of that design
(no position effect is left in the served term) but leaves a fit nothing to separate; per order it varies,
so the fit still tells content (the same candidate scoring high wherever it is shown) from position (every
candidate scoring high at position 0), for P < n and P = n alike. For a model that echoes the position the
LLM term is the control (`confounded`). Neither the raw position nor 1/(1+position) (listwise's transform)
is used: a first-label preference is not a linear function of either. The rows go to eval.tune.fit_llm_term,
which decides what ships exactly as for listwise (the bootstrap resamples impressions, so an impression's
P rows stay together).

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
    """Scoring-mode fitting rows: one per candidate sent and answered shown order, grouped by impression."""

    prior: np.ndarray
    logprob: np.ndarray  # the candidate's normalised label log-probability in that shown order
    position: np.ndarray  # the position control (position_control)
    y: np.ndarray
    groups: np.ndarray
    impressions: int
    record: dict[str, Any] = field(default_factory=dict)  # counts for the weights' meta


def position_control(by_order: list[list[tuple[int, float]]], n_shown: list[int]) -> tuple[np.ndarray, dict[str, float]]:
    """Per (candidate, answered shown order) row, the LLM term of a position-only model; and that model.

    `by_order[r]`: candidate r's (position shown, log-probability) per answered order
    (CandidateScores.by_order); `n_shown[r]`: how many candidates its impression showed. The profile is the
    mean log-probability at each (n, position) over all of them; a row's control is the profile at the
    position it was shown at. Rows are candidate by candidate, each candidate's orders in by_order's order."""
    sums: dict[tuple[int, int], list[float]] = {}
    for shown, n in zip(by_order, n_shown, strict=True):
        for p, lp in shown:
            sums.setdefault((n, p), []).append(lp)
    profile = {key: float(np.mean(v)) for key, v in sums.items()}
    control = np.array([profile[(n, p)] for shown, n in zip(by_order, n_shown, strict=True) for p, _ in shown])
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
    partial = missing = calls = answered = 0
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
        answered += res.answered
        for c in sent[:n]:
            a = c.ad.ad_id
            k = len(res.by_order[a])  # one row per answered order
            priors += [c.prior_score] * k
            lps += [lp for _, lp in res.by_order[a]]
            shown.append(res.by_order[a])
            n_shown.append(n)
            ys += [1.0 if a in clicked else 0.0] * k
            groups += [g] * k
    position, profile = position_control(shown, n_shown)
    record = {
        **counts,
        "failures": failures,
        "partially_answered": partial,
        "missing_labels": missing,
        "calls": calls,
        "answered_calls": answered,
        "permutations": scorer.permutations,
        "n_candidates": n_candidates,
        "prompt": scorer.prompt_info,
        "model": scorer.model,
        "rows": "one per candidate sent and answered shown order (serving adds the mean over orders)",
        "llm_feature": "normalised label log-probability in the shown order (agent.scorer CandidateScores.by_order)",
        "position_feature": "the position-only LLM term: the mean log-probability at the row's shown position (the "
        "profile below, 'n:position')",
        "position_profile": profile,
    }
    log.info("scoring-mode rows", extra=record)
    return ScoreRows(
        np.array(priors), np.array(lps), position, np.array(ys), np.array(groups, dtype=np.int64), counts["scored"], record,
    )  # fmt: skip
