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

from retrieval.records import ImpressionRecord, iter_impressions

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


@dataclass(slots=True)
class Cleaned:
    """One well-formed record against the catalog: the impression, or the rule that skips it; and the
    unknown/repeated ids dropped from it (counted in `warnings` only when the impression is kept)."""

    item: EvalImpression | None
    skip: str | None
    unknown: dict[str, int]


def clean_record(rec: ImpressionRecord, *, catalog: Mapping[str, int], line: int) -> Cleaned:
    """Every per-record rule of `load_impressions` (all but duplicate_impression_id, which needs the file)."""
    if not rec.clicked:
        return Cleaned(None, "no_click", {})
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
        return Cleaned(None, "clicked_not_in_catalog", n_unknown)
    if not history:
        return Cleaned(None, "empty_history", n_unknown)
    if cands is not None:
        if not cands:
            return Cleaned(None, "no_candidates_in_catalog", n_unknown)
        in_cands = set(cands)
        clicked = [c for c in clicked if c in in_cands]
        if not clicked:
            return Cleaned(None, "clicked_not_in_candidates", n_unknown)
    return Cleaned(EvalImpression(rec.impression_id, rec.user_id, history, cands, frozenset(clicked), line), None, n_unknown)


class ImpressionCollector:
    """Cleaned records in file order into a LoadedImpressions: the duplicate rule (the first id is kept)
    and the counts, in one place for the single-process reader and the Ray one (eval/distributed)."""

    def __init__(self) -> None:
        self.items: list[EvalImpression] = []
        self.skipped: Counter[str] = Counter({r: 0 for r in SKIP_RULES})
        self.warnings: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.n_read = 0

    def add(self, impression_id: str, cleaned: Cleaned | None) -> bool:
        """Count one record (cleaned=None: not cleaned yet, e.g. a duplicate); True when it is kept."""
        self.n_read += 1
        if impression_id in self.seen:
            self.skipped["duplicate_impression_id"] += 1
            return False
        self.seen.add(impression_id)
        assert cleaned is not None, "a first occurrence must come cleaned"
        if cleaned.skip is not None:
            self.skipped[cleaned.skip] += 1
            return False
        for k, v in cleaned.unknown.items():
            if v:
                self.warnings[k] += v
        if any(cleaned.unknown.values()):
            self.warnings["impressions_with_unknown_or_repeated_ids"] += 1
        self.items.append(cleaned.item)  # type: ignore[arg-type]
        return True

    def result(self) -> LoadedImpressions:
        return LoadedImpressions(self.items, self.n_read, dict(self.skipped), dict(self.warnings))


def load_impressions(path: Path, *, catalog: Mapping[str, int], limit: int | None = None) -> LoadedImpressions:
    """The first `limit` impressions of `path` (file order), cleaned against the catalog's ids."""
    out = ImpressionCollector()
    for lineno, rec in iter_impressions(path):
        if limit is not None and out.n_read >= limit:
            break
        out.add(rec.impression_id, None if rec.impression_id in out.seen else clean_record(rec, catalog=catalog, line=lineno))
    return out.result()


def read_user_ids(path: Path, *, limit: int | None = None) -> set[str]:
    """Users of the first `limit` impressions of a file (all when None)."""
    users: set[str] = set()
    for n, (_, rec) in enumerate(iter_impressions(path)):
        if limit is not None and n >= limit:
            break
        users.add(rec.user_id)
    return users
