"""Logged impressions cleaned for evaluation: bad data is skipped by a named rule, never crashes a run.

A malformed line (not JSON, not an object, a field of the wrong type) is an error in the file and
raises DataFileError naming file and line (from retrieval.records). A well-formed impression that
cannot be evaluated is counted under one rule in `skipped` and left out:

- duplicate_impression_id: the id was seen earlier in the file (the first one is kept);
- no_click: nothing clicked;
- clicked_not_in_catalog: no clicked id is in the catalog;
- empty_history: no history id is in the catalog (nothing to personalise on);
- no_candidates_in_catalog: logged candidates were given but none is in the catalog;
- clicked_not_in_candidates: logged candidates were given but no clicked id is among them.

Unknown ids inside an otherwise usable impression are dropped and counted in `warnings`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.records import iter_impressions

SKIP_RULES: tuple[str, ...] = (
    "duplicate_impression_id",
    "no_click",
    "clicked_not_in_catalog",
    "empty_history",
    "no_candidates_in_catalog",
    "clicked_not_in_candidates",
)


@dataclass(slots=True)
class EvalImpression:
    impression_id: str
    user_id: str
    history: list[str]  # catalog ids only, oldest first
    candidates: list[str] | None  # catalog ids only, logged order; None = full-catalog protocol
    clicked: frozenset[str]  # catalog ids only
    line: int

    @property
    def protocol(self) -> str:
        return "full" if self.candidates is None else "logged"


@dataclass
class LoadedImpressions:
    items: list[EvalImpression]
    n_read: int
    skipped: dict[str, int]
    warnings: dict[str, int] = field(default_factory=dict)

    @property
    def users(self) -> set[str]:
        return {i.user_id for i in self.items}


def load_impressions(path: Path, *, catalog: Mapping[str, int], limit: int | None = None) -> LoadedImpressions:
    """The first `limit` impressions of `path` (file order), cleaned against the catalog's ids."""
    items: list[EvalImpression] = []
    skipped: Counter[str] = Counter({r: 0 for r in SKIP_RULES})
    warnings: Counter[str] = Counter()
    seen: set[str] = set()
    n_read = 0
    for lineno, rec in iter_impressions(path):
        if limit is not None and n_read >= limit:
            break
        n_read += 1
        if rec.impression_id in seen:
            skipped["duplicate_impression_id"] += 1
            continue
        seen.add(rec.impression_id)
        if not rec.clicked:
            skipped["no_click"] += 1
            continue
        clicked = [c for c in dict.fromkeys(rec.clicked) if c in catalog]
        history = [h for h in rec.history if h in catalog]
        cands = [c for c in dict.fromkeys(rec.candidates) if c in catalog] if rec.candidates else None
        n_unknown = {
            "unknown_history_ids": len(rec.history) - len(history),
            "unknown_clicked_ids": len(set(rec.clicked)) - len(clicked),
            "unknown_candidate_ids": len(set(rec.candidates)) - len(cands) if cands is not None else 0,
            "repeated_candidate_ids": len(rec.candidates) - len(set(rec.candidates)),
        }
        if not clicked:
            skipped["clicked_not_in_catalog"] += 1
            continue
        if not history:
            skipped["empty_history"] += 1
            continue
        if cands is not None:
            if not cands:
                skipped["no_candidates_in_catalog"] += 1
                continue
            in_cands = set(cands)
            clicked = [c for c in clicked if c in in_cands]
            if not clicked:
                skipped["clicked_not_in_candidates"] += 1
                continue
        for k, v in n_unknown.items():
            if v:
                warnings[k] += v
        if any(n_unknown.values()):
            warnings["impressions_with_unknown_or_repeated_ids"] += 1
        items.append(EvalImpression(rec.impression_id, rec.user_id, history, cands, frozenset(clicked), lineno))
    return LoadedImpressions(items, n_read, dict(skipped), dict(warnings))


def read_user_ids(path: Path, *, limit: int | None = None) -> set[str]:
    """Users of the first `limit` impressions of a file (all when None)."""
    users: set[str] = set()
    for n, (_, rec) in enumerate(iter_impressions(path)):
        if limit is not None and n >= limit:
            break
        users.add(rec.user_id)
    return users
