"""Prior features of (user, candidate) pairs: dense similarity, co-visitation, popularity, next-item score.

Every feature is computed for any list of catalog rows with a few matrix products, so the same code
scores retrieved candidates (full catalog) and logged candidates (rank what was shown). The products
go through retrieval.similarity (BLAS at the thread count every process pins): the same bits in every process.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from retrieval.behaviour import BehaviourStats
from retrieval.similarity import pair_dots, row_dots
from retrieval.store import CatalogIndex

FEATURES: tuple[str, ...] = (
    "dense",  # cosine(user profile, ad): recency-weighted pooled history (+ events)
    "dense_last",  # cosine(last history item, ad)
    "dense_max",  # max cosine over history items
    "covisit",  # log1p(sum_h w_h * symmetric co-visits(h, ad))
    "covisit_next",  # log1p(sum over the last 3 items of forward co-visits(h -> ad))
    "covisit_norm",  # covisit share: co-visits(h, ad) / (popularity(ad) + 10), recency-weighted
    "popularity",  # log1p(popularity(ad))
    "cf",  # cosine(recency-weighted collaborative profile, ad's collaborative vector)
    "cf_max",  # max collaborative cosine over history items
    "covisit_cos",  # log1p(100 * sum_h w_h * co-visits(h, ad) / sqrt(pop(h) * pop(ad)))
    "sequence",  # the sequence model's next-item logit for the ad after the history (0 without a model or history)
)
SEQUENCE = FEATURES.index("sequence")
_COMPUTE = object()  # compute_features(cf_vector=...) not given: computed here


@dataclass
class UserProfile:
    rows: np.ndarray  # history rows, oldest first (known ids only)
    weights: np.ndarray  # recency weights, same length, sum 1
    vector: np.ndarray | None  # pooled L2-normalised profile, None for an empty profile
    event_vectors: np.ndarray | None = None
    history_vectors: np.ndarray | None = None  # index.vectors[rows], gathered once (the pooling and the features read it)


@lru_cache(maxsize=1024)  # a few history lengths x one decay: computed once each, shared read-only
def recency_weights(n: int, decay: float) -> np.ndarray:
    if n == 0:
        w = np.zeros(0, dtype=np.float32)
    else:
        w = decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        w = (w / w.sum()).astype(np.float32)
    w.setflags(write=False)
    return w


def build_profile(
    index: CatalogIndex,
    rows: list[int],
    *,
    decay: float,
    event_vectors: np.ndarray | None = None,
    event_weight: float = 0.5,
) -> UserProfile:
    r = np.asarray(rows, dtype=np.int64)
    w = recency_weights(len(r), decay)
    parts = []
    hv = index.vectors[r] if len(r) else None
    if hv is not None:
        parts.append((w[:, None] * hv).sum(axis=0))
    if event_vectors is not None and len(event_vectors):
        ev = event_vectors.mean(axis=0)
        parts.append(ev * (event_weight if len(r) else 1.0))
    vec = None
    if parts:
        v = parts[0] if len(parts) == 1 else np.sum(parts, axis=0)  # np.sum of one array: that array
        norm = float(np.sqrt(v.dot(v)))  # np.linalg.norm of a real vector, without its dispatch
        vec = (v / norm).astype(np.float32) if norm > 0 else None
    return UserProfile(rows=r, weights=w, vector=vec, event_vectors=event_vectors, history_vectors=hv)


@dataclass(frozen=True, slots=True)
class Covisit:
    """A history's symmetric co-visitation: its rows gathered once (None: no history or no co-visits) and their
    recency-weighted mix with every catalog row. The covisit source and feature read `scores`; the cosine
    feature mixes the same `rows` with other weights, so the gather is not done twice per request."""

    rows: _RowGather | None
    scores: np.ndarray  # (n,) float32


def covisit_mix(behaviour: BehaviourStats, profile: UserProfile) -> Covisit:
    if len(profile.rows) == 0 or behaviour.symmetric.nnz == 0:
        return Covisit(None, np.zeros(len(behaviour.popularity), dtype=np.float32))
    rows = _RowGather(behaviour.symmetric, profile.rows)
    return Covisit(rows, rows.mix(profile.weights).astype(np.float32))


def covisit_scores(behaviour: BehaviourStats, profile: UserProfile) -> np.ndarray:
    """Recency-weighted symmetric co-visitation with every catalog row: a dense (n,) vector."""
    return covisit_mix(behaviour, profile).scores


class _RowGather:
    """The non-zeros of some rows of a CSR matrix, gathered once: several weightings of the same rows
    (co-visitation and its cosine share) reuse the gather and give the bits a gather per weighting gives."""

    __slots__ = ("n_cols", "lens", "values", "columns")

    def __init__(self, matrix, rows: np.ndarray):
        # The CSR arrays read directly (no sliced sparse matrix per call: scipy's indexing costs more than the sum).
        # A history has a few rows of ~100 non-zeros: slicing each row beats building a position array.
        indptr, data, indices = matrix.indptr, matrix.data, matrix.indices
        starts, ends = indptr[rows], indptr[rows + 1]
        self.n_cols = matrix.shape[1]
        self.lens = lens = ends - starts
        self.values = self.columns = None
        if lens.any():
            spans = list(zip(starts.tolist(), ends.tolist()))
            self.values = np.concatenate([data[a:b] for a, b in spans])
            self.columns = np.concatenate([indices[a:b] for a, b in spans])

    def mix(self, weights: np.ndarray) -> np.ndarray:
        """sum_i weights[i] * row_i as a dense float64 vector (products in the matrix's dtype, summed by bincount)."""
        if self.values is None:
            return np.zeros(self.n_cols, dtype=np.float32)
        vals = self.values * np.repeat(np.asarray(weights, dtype=self.values.dtype), self.lens)
        return np.bincount(self.columns, weights=vals, minlength=self.n_cols)


def cf_profile(behaviour: BehaviourStats, profile: UserProfile, *, history_cf: np.ndarray | None = None) -> np.ndarray | None:
    """`history_cf`: behaviour.cf[profile.rows] when the caller has gathered it already."""
    if behaviour.cf is None or len(profile.rows) == 0:
        return None
    v = row_dots((behaviour.cf[profile.rows] if history_cf is None else history_cf).T, profile.weights)
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else None


def compute_features(
    index: CatalogIndex,
    behaviour: BehaviourStats,
    profile: UserProfile,
    cand_rows: np.ndarray,
    *,
    covisit: Covisit | None = None,
    sequence: np.ndarray | None = None,
    sequence_at: np.ndarray | None = None,
    cf_vector: np.ndarray | None | object = _COMPUTE,
) -> np.ndarray:
    """(len(cand_rows), len(FEATURES)) float32 matrix, columns in FEATURES order.

    `covisit` is covisit_mix() when the caller already has it (candidate generation computes it);
    `sequence` is the sequence model's (n_items,) next-item scores for this history (None: column 0), or
    `sequence_at` its scores at `cand_rows` only (the logged rows: no catalog-sized product or vector);
    `cf_vector` is cf_profile() when the caller already has it (None included: no collaborative profile)."""
    c = np.asarray(cand_rows, dtype=np.int64)
    out = np.zeros((len(c), len(FEATURES)), dtype=np.float32)
    if len(c) == 0:
        return out
    cv = index.vectors[c]
    h = profile.rows
    if profile.vector is not None:
        out[:, 0] = row_dots(cv, profile.vector)
    if len(h):
        sims = pair_dots(cv, index.vectors[h] if profile.history_vectors is None else profile.history_vectors)  # (c, h)
        out[:, 1] = sims[:, -1]
        out[:, 2] = sims.max(axis=1)
        w = profile.weights
        if behaviour.symmetric.nnz:
            # One gather of the history's co-visitation rows for both weightings (Covisit); the cosine mix is cast
            # to float32 at the candidates' entries only (the same bits as casting the whole vector, then indexing).
            mix = covisit if covisit is not None else covisit_mix(behaviour, profile)
            co = mix.scores[c]
            out[:, 3] = np.log1p(co * len(h))
            last = h[-3:]
            fwd = _RowGather(behaviour.forward, last).mix(np.ones(len(last), dtype=np.float32))
            out[:, 4] = np.log1p(fwd[c].astype(np.float32))
            pop_c = behaviour.popularity[c]
            out[:, 5] = (co * len(h)) / (pop_c + 10.0)
            root_h = np.sqrt(np.maximum(behaviour.popularity[h], 1.0))
            co_cos = mix.rows.mix((w / root_h).astype(np.float32))[c].astype(np.float32)
            out[:, 9] = np.log1p(100.0 * co_cos / np.sqrt(np.maximum(pop_c, 1.0)))
        if behaviour.cf is not None:
            ch = behaviour.cf[h]  # one gather for the profile and the max
            cfp = cf_profile(behaviour, profile, history_cf=ch) if cf_vector is _COMPUTE else cf_vector
            cc = behaviour.cf[c]
            if cfp is not None:
                out[:, 7] = row_dots(cc, cfp)
            out[:, 8] = pair_dots(cc, ch).max(axis=1)
    elif profile.vector is not None and profile.event_vectors is not None:
        sims = pair_dots(cv, profile.event_vectors)
        out[:, 1] = sims[:, -1]
        out[:, 2] = sims.max(axis=1)
    out[:, 6] = np.log1p(behaviour.popularity[c])
    if sequence_at is not None:
        out[:, SEQUENCE] = sequence_at
    elif sequence is not None:
        out[:, SEQUENCE] = sequence[c]
    return out
