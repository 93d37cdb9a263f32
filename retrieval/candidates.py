"""Candidate generation: Chroma nearest neighbours ∪ co-visitation ∪ collaborative neighbours ∪ popular ads
∪ the sequence model's top next items.

Logged candidates (the request names what may be shown) skip generation and are scored by the same
prior features. Returns catalog rows plus the feature matrix; fusion happens in the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.behaviour import BehaviourStats
from retrieval.features import UserProfile, cf_profile, compute_features, covisit_mix
from retrieval.projected_search import ProjectedSearch
from retrieval.sequence import SequenceModel
from retrieval.similarity import row_dots
from retrieval.store import AdStore, CatalogIndex


@dataclass
class CandidateSet:
    rows: np.ndarray  # catalog rows
    features: np.ndarray  # (len(rows), len(FEATURES))
    by_source: dict[str, np.ndarray] = field(default_factory=dict)  # generator name -> the rows it produced, best first

    @property
    def sources(self) -> dict[int, list[str]]:
        """row -> which generators produced it (built on demand: the hot path never reads it)."""
        keep = set(self.rows.tolist())
        out: dict[int, list[str]] = {}
        for name, rows in self.by_source.items():
            for r in rows.tolist():
                if r in keep:
                    out.setdefault(r, []).append(name)
        return out


@dataclass
class CandidateGenerator:
    index: CatalogIndex
    store: AdStore | None
    behaviour: BehaviourStats
    n_dense: int = 100
    n_covisit: int = 100
    n_popular: int = 30
    n_cf: int = 100
    use_chroma: bool = True  # False: exact numpy top-k over the in-memory matrix (eval's bulk path)
    sequence: SequenceModel | None = None  # next-item model: the `sequence` feature and source (None: both off)
    n_sequence: int = 100

    def sequence_scores(self, profile: UserProfile) -> np.ndarray | None:
        """The model's (n_items,) next-item scores after this history: one forward pass per request."""
        if self.sequence is None or len(profile.rows) == 0:
            return None
        return self.sequence.scores(profile.rows)

    def _top(self, scores: np.ndarray | None, n: int) -> list[int]:
        if scores is None or n <= 0:
            return []
        k = min(n, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.argsort(-scores[top], kind="stable")].tolist()
    # Catalogs up to this size are searched exactly in memory whenever the `where` filter can be evaluated
    # there (retrieval.metadata_mask): at 16,859 x 384 one matrix-vector product beats a Chroma query.
    exact_max_ads: int = 0
    # Exact searches over catalogs of at least this many ads go through the two-stage projected search
    # (retrieval.projected_search: the same top k, a third of the memory read); 0: always the full scan.
    projected_min_ads: int = 0
    # (the vectors it was built from, the search): an init field, so dataclasses.replace (a reload that swaps the
    # behaviour tables) hands the built search on; a new index's vectors build a new one
    projected_cache: tuple[np.ndarray, ProjectedSearch] | None = field(default=None, repr=False, compare=False)

    def projected(self) -> ProjectedSearch | None:
        """The two-stage search over this index, built on first use (None: the full scan is the rule here)."""
        if self.projected_min_ads <= 0 or len(self.index) < self.projected_min_ads:
            return None
        if self.projected_cache is None or self.projected_cache[0] is not self.index.vectors:
            self.projected_cache = (self.index.vectors, ProjectedSearch(self.index.vectors))
        return self.projected_cache[1]

    def searches_exactly(self) -> bool:
        """Dense neighbours by exact in-memory search, or by a Chroma HNSW query: the one rule the dense
        source and eval's dense baseline (eval.baselines.dense_full) follow. Exact search finds the same
        neighbours in every process; an embedded Chroma's HNSW does not (each process replays the
        collection's unpersisted tail, up to hnsw sync_threshold - 1 records, into its own in-memory graph,
        and the graphs differ, so its approximate neighbours differ now and then between processes; a
        `chroma run` server has one graph)."""
        return not self.use_chroma or self.store is None or len(self.index) <= self.exact_max_ads

    def _dense(self, profile: UserProfile, n: int, where: dict | None) -> list[int]:
        if profile.vector is None or n <= 0:
            return []
        mask = None  # None: every row may be returned
        if self.use_chroma and self.store is not None:
            exact = self.searches_exactly()
            if exact and where is not None:
                mask = self.index.columns.mask(where)
            if not exact or (where is not None and mask is None):
                hits = self.store.nearest(profile.vector, min(n, len(self.index)), where=where)
                return [self.index.row[i] for i, _ in hits if i in self.index.row]
        if mask is None or mask.all():
            fast = self.projected()
            if fast is not None:
                return fast.top(profile.vector, n).tolist()
        sims = row_dots(self.index.vectors, profile.vector)
        if mask is not None and not mask.all():
            allowed = np.flatnonzero(mask)
            k = min(n, len(allowed))
            if k == 0:
                return []
            top = allowed[np.argpartition(-sims[allowed], k - 1)[:k]]
        else:
            k = min(n, len(sims))
            top = np.argpartition(-sims, k - 1)[:k]
        return top[np.argsort(-sims[top], kind="stable")].tolist()

    def _covisit(self, scores: np.ndarray, n: int) -> list[int]:
        if n <= 0:
            return []
        nz = np.flatnonzero(scores)
        if len(nz) == 0:
            return []
        k = min(n, len(nz))
        top = nz[np.argpartition(-scores[nz], k - 1)[:k]]
        return top[np.argsort(-scores[top], kind="stable")].tolist()

    def _cf(self, v: np.ndarray | None, n: int) -> list[int]:
        """`v`: cf_profile() of the user (None: no collaborative profile)."""
        if v is None or n <= 0:
            return []
        sims = row_dots(self.behaviour.cf, v)
        k = min(n, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        return top[np.argsort(-sims[top], kind="stable")].tolist()

    def generate(
        self,
        profile: UserProfile,
        *,
        exclude: set[int] | None = None,
        where: dict | None = None,
    ) -> CandidateSet:
        """`where` prefilters Chroma's neighbours; the pipeline re-checks eligibility on every source's rows."""
        exclude = exclude or set()
        covisit = covisit_mix(self.behaviour, profile)  # the source and two features read it
        seq = self.sequence_scores(profile)
        cfv = cf_profile(self.behaviour, profile)  # once: the cf source and the cf feature read it
        by_source = {
            name: np.asarray(rows, dtype=np.int64)
            for name, rows in (
                ("dense", self._dense(profile, self.n_dense + len(exclude), where)),
                ("covisit", self._covisit(covisit.scores, self.n_covisit + len(exclude))),
                ("cf", self._cf(cfv, self.n_cf + len(exclude))),
                ("popular", self.behaviour.top_popular(self.n_popular + len(exclude))),
                ("sequence", self._top(seq, self.n_sequence + len(exclude))),
            )
        }
        pooled = np.concatenate(list(by_source.values()))
        if exclude:
            drop = np.zeros(len(self.index), dtype=bool)  # a row mask: what np.isin computes, without its sort
            drop[np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = True
            pooled = pooled[~drop[pooled]]
        _, first = np.unique(pooled, return_index=True)
        rows = pooled[np.sort(first)]  # each row once, in the order the generators produced it
        feats = compute_features(self.index, self.behaviour, profile, rows, covisit=covisit, sequence=seq, cf_vector=cfv)
        return CandidateSet(rows, feats, by_source)

    def score_logged(self, profile: UserProfile, rows: list[int]) -> CandidateSet:
        r = np.asarray(rows, dtype=np.int64)
        seq = None
        if self.sequence is not None and len(profile.rows):
            # Only the given rows are read: their logits, not the whole catalog's (n_items x hidden) product.
            seq = self.sequence.items[r] @ self.sequence.user_vector(profile.rows)
        feats = compute_features(self.index, self.behaviour, profile, r, sequence_at=seq)
        return CandidateSet(r, feats, {"logged": r})
