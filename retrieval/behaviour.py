"""Behavioural priors learned from logged histories only (never from `clicked`).

- popularity: how often an ad appears in histories (recency-weighted per history);
- co-visitation: within a window of `window` steps, how often ad j follows ad i (`forward`) and how often
  the two appear close together in either order (`symmetric`), each pair weighted by decay**(gap-1).
Both tables are indexed by the catalog's row numbers and saved under the data dir.
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
    popularity: np.ndarray  # (n,) float32 raw weighted counts
    forward: sp.csr_matrix  # (n, n): i then j
    symmetric: sp.csr_matrix  # (n, n): i and j close in either order
    n_histories: int
    window: int
    decay: float

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
    ) -> "BehaviourStats":
        row = {a: i for i, a in enumerate(ids)}
        n = len(ids)
        pop = np.zeros(n, dtype=np.float64)
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        seen_hist: set[tuple[int, ...]] = set()
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
        log.info("behaviour learned", extra={"histories": used, "pairs": fwd.nnz})
        return cls(ids, pop.astype(np.float32), fwd, sym, used, window, decay)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        sp.save_npz(directory / "covisit_forward.npz", self.forward)
        np.save(directory / "popularity.npy", self.popularity)
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
        stats = cls(meta["ids"], pop, fwd, (fwd + fwd.T).tocsr(), meta["n_histories"], meta["window"], meta["decay"])
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
        return BehaviourStats(ids, pop, fwd, (fwd + fwd.T).tocsr(), self.n_histories, self.window, self.decay)

    def top_popular(self, n: int) -> np.ndarray:
        if n <= 0 or not self.popularity.any():
            return np.zeros(0, dtype=np.int64)
        k = min(n, len(self.popularity))
        part = np.argpartition(-self.popularity, k - 1)[:k]
        part = part[self.popularity[part] > 0]
        return part[np.argsort(-self.popularity[part], kind="stable")]
