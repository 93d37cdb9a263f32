"""Behavioural priors learned from logged histories only (never from `clicked`).

- popularity: in how many distinct histories an ad appears (a plain count, once per history, no recency weight);
- co-visitation: within a window of `window` steps, how often ad j follows ad i (`forward`) and how often
  the two appear close together in either order (`symmetric`), each pair weighted by decay**(gap-1);
- collaborative item vectors: positive PMI of "in the same history" co-occurrence, factorised by a
  truncated SVD (`cf`, L2-normalised rows): items bought by the same people land close together even
  when no single pair was co-visited often.
All tables are indexed by the catalog's row numbers and saved under the data dir.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class BehaviourStats:
    ids: list[str]  # the catalog row order these tables were built for
    popularity: np.ndarray  # (n,) float32 counts of distinct histories holding the ad
    forward: sp.csr_matrix  # (n, n): i then j
    symmetric: sp.csr_matrix  # (n, n): i and j close in either order
    n_histories: int
    window: int
    decay: float
    cf: np.ndarray | None = None  # (n, d) float32 collaborative item vectors, zero rows for unseen items

    @classmethod
    def empty(cls, ids: list[str], *, window: int = 5, decay: float = 0.8) -> "BehaviourStats":
        n = len(ids)
        z = sp.csr_matrix((n, n), dtype=np.float32)
        return cls(ids, np.zeros(n, dtype=np.float32), z, z.copy(), 0, window, decay)

    @classmethod
    def learn(
        cls,
        histories: Sequence[Sequence[str]],
        ids: list[str],
        *,
        window: int = 5,
        decay: float = 0.8,
        cf_dims: int = 64,
    ) -> "BehaviourStats":
        row = {a: i for i, a in enumerate(ids)}
        n = len(ids)
        pop = np.zeros(n, dtype=np.float64)
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        seen_hist: set[tuple[int, ...]] = set()
        baskets: list[list[int]] = []
        used = 0
        for hist in histories:
            seq = [row[a] for a in hist if a in row]
            if not seq:
                continue
            key = tuple(seq)
            # Users appear in several logged impressions with the same (or a prefix) history; count each once.
            if key in seen_hist:
                continue
            seen_hist.add(key)
            used += 1
            baskets.append(sorted(set(seq)))
            for r in set(seq):
                pop[r] += 1.0
            L = len(seq)
            for p in range(L):
                for gap in range(1, window + 1):
                    q = p + gap
                    if q >= L:
                        break
                    if seq[q] == seq[p]:
                        continue
                    rows.append(seq[p])
                    cols.append(seq[q])
                    vals.append(decay ** (gap - 1))
        fwd = sp.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(n, n))
        fwd.sum_duplicates()
        sym = (fwd + fwd.T).tocsr()
        cf = collaborative_vectors(baskets, n, dims=cf_dims)
        log.info("behaviour learned", extra={"histories": used, "pairs": fwd.nnz})
        return cls(ids, pop.astype(np.float32), fwd, sym, used, window, decay, cf)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        sp.save_npz(directory / "covisit_forward.npz", self.forward)
        np.save(directory / "popularity.npy", self.popularity)
        if self.cf is not None:
            np.save(directory / "cf.npy", self.cf)
        (directory / "behaviour.json").write_text(
            json.dumps({"ids": self.ids, "n_histories": self.n_histories, "window": self.window, "decay": self.decay})
        )

    @classmethod
    def load(cls, directory: Path, ids: list[str]) -> "BehaviourStats | None":
        meta_path = directory / "behaviour.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        fwd = sp.load_npz(directory / "covisit_forward.npz").tocsr().astype(np.float32)
        pop = np.load(directory / "popularity.npy").astype(np.float32)
        cf_path = directory / "cf.npy"
        cf = np.ascontiguousarray(np.load(cf_path), dtype=np.float32) if cf_path.exists() else None
        stats = cls(meta["ids"], pop, fwd, (fwd + fwd.T).tocsr(), meta["n_histories"], meta["window"], meta["decay"], cf)
        return stats.aligned_to(ids)

    def aligned_to(self, ids: list[str]) -> "BehaviourStats":
        """Re-index onto another catalog row order (after a re-ingest changed the order or the ads)."""
        if ids == self.ids:
            return self
        old = {a: i for i, a in enumerate(self.ids)}
        n = len(ids)
        take = np.array([old.get(a, -1) for a in ids])
        have = take >= 0
        # P maps old rows -> new rows
        P = sp.csr_matrix((np.ones(int(have.sum()), dtype=np.float32), (np.nonzero(have)[0], take[have])), shape=(n, len(self.ids)))
        fwd = (P @ self.forward @ P.T).tocsr()
        pop = np.zeros(n, dtype=np.float32)
        pop[have] = self.popularity[take[have]]
        cf = None
        if self.cf is not None:
            cf = np.zeros((n, self.cf.shape[1]), dtype=np.float32)
            cf[have] = self.cf[take[have]]
        return BehaviourStats(ids, pop, fwd, (fwd + fwd.T).tocsr(), self.n_histories, self.window, self.decay, cf)

    def top_popular(self, n: int) -> np.ndarray:
        if n <= 0 or not self.popularity.any():
            return np.zeros(0, dtype=np.int64)
        k = min(n, len(self.popularity))
        part = np.argpartition(-self.popularity, k - 1)[:k]
        part = part[self.popularity[part] > 0]
        return part[np.argsort(-self.popularity[part], kind="stable")]


def collaborative_vectors(baskets: Sequence[Sequence[int]], n: int, *, dims: int) -> np.ndarray | None:
    """Positive-PMI item co-occurrence (same history), truncated SVD, rows L2-normalised."""
    if not baskets or n < 3:
        return None
    rows = [u for u, b in enumerate(baskets) for _ in b]
    cols = [r for b in baskets for r in b]
    ui = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(baskets), n))
    pop = np.asarray(ui.sum(axis=0)).ravel().astype(np.float64)
    co = (ui.T @ ui).tocoo()
    keep = co.row != co.col
    r, c, v = co.row[keep], co.col[keep], co.data[keep].astype(np.float64)
    if len(v) == 0:
        return None
    pmi = np.maximum(np.log(v * v.sum() / (pop[r] * pop[c])), 0.0)
    mat = sp.csr_matrix((pmi, (r, c)), shape=(n, n))
    mat.eliminate_zeros()
    k = max(1, min(dims, n - 2, mat.nnz // 2 or 1))
    from scipy.sparse.linalg import svds

    u, s, _ = svds(mat, k=k, random_state=0)
    vecs = u * np.sqrt(s)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    vecs[pop == 0] = 0.0
    return np.ascontiguousarray(vecs, dtype=np.float32)
