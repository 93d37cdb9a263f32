"""Exact top-k inner-product search in two stages: a small projection bounds every score, the full vectors
re-score only the rows the bound cannot rule out.

At load the catalog's vectors X (n, d) get an orthonormal basis P (d, p) of their top principal directions
(the eigenvectors of XᵀX) and their projections Xp = X P (n, p) with the residual norms r_i = ‖x_i − P Pᵀ x_i‖.
For a query q with projection qp = Pᵀ q and residual norm ρ = ‖q − P qp‖, Cauchy–Schwarz on the residuals gives

    |x_i · q − xp_i · qp| ≤ r_i ρ      for every row i.

Stage one scores all rows in p dimensions (at Games 16,859 × 128 fp32 = 8.6 MB instead of 26 MB), re-scores the
`shortlist` best of them exactly and takes τ = the k-th best of those exact scores: the true k-th score is at
least τ. Every row whose upper bound xp_i · qp + r_i ρ is below τ cannot be in the top k; stage two re-scores
the rest exactly (~780 rows per Games request at p = 128) and returns the k best. The result is the exact top k
(up to a slack far above fp32 rounding), ties broken by row, so it does not depend on which rows stage one kept.
The exact scores are similarity.row_dots_by_row (one loop per row: a row gets the same bits in any subset; a BLAS
gemv over a subset rounds the last bit differently now and then, 200 of 230,000 Games scores, which made
duplicate ads swap). They can differ in the last bit from the full scan's BLAS gemv, so near-exact ties at the
k-th place may differ from the full scan's choice: measured in bench/check_identical.py.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from retrieval.similarity import row_dots, row_dots_by_row

log = logging.getLogger(__name__)

# Slack added to every bound: fp32 dot products over 384 dimensions of unit vectors round well below 1e-5.
_SLACK = np.float32(1e-4)


class ProjectedSearch:
    def __init__(self, vectors: np.ndarray, *, dims: int = 128, shortlist: int = 200):
        t0 = time.perf_counter()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors = x
        p = max(1, min(dims, x.shape[1]))
        _, basis = np.linalg.eigh((x.T @ x).astype(np.float64))  # ascending eigenvalues
        self.basis = np.ascontiguousarray(basis[:, ::-1][:, :p].astype(np.float32))  # (d, p)
        self.projected = np.ascontiguousarray(x @ self.basis)  # (n, p)
        resid2 = (x.astype(np.float64) ** 2).sum(axis=1) - (self.projected.astype(np.float64) ** 2).sum(axis=1)
        self.residual = np.sqrt(np.maximum(resid2, 0.0)).astype(np.float32)
        self.shortlist = shortlist
        self.build_s = time.perf_counter() - t0
        log.info("projected search built", extra={"rows": len(x), "dims": p, "build_ms": round(1000 * self.build_s, 1)})

    def __len__(self) -> int:
        return len(self.vectors)

    def top(self, query: np.ndarray, k: int) -> np.ndarray:
        """The k rows with the largest exact `vectors @ query`, best first, ties by row (int64)."""
        n = len(self.vectors)
        k = min(k, n)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        q = np.asarray(query, dtype=np.float32)
        qp = q @ self.basis
        approx = row_dots(self.projected, qp)
        rho = np.float32(np.sqrt(max(float(q @ q) - float(qp @ qp), 0.0)))
        m = min(max(self.shortlist, k), n)
        short = np.argpartition(-approx, m - 1)[:m] if m < n else np.arange(n)
        exact_short = row_dots_by_row(self.vectors[short], q)
        tau = np.partition(exact_short, m - k)[m - k]  # the k-th best exact score among the shortlist
        keep = np.flatnonzero(approx + rho * self.residual + _SLACK >= tau)
        scores = row_dots_by_row(self.vectors[keep], q)
        if k < len(keep):  # every row tied with the k-th score stays, so the cut below breaks the tie by row
            kth = np.partition(scores, len(keep) - k)[len(keep) - k]
            best = np.flatnonzero(scores >= kth)
            keep, scores = keep[best], scores[best]
        return keep[np.lexsort((keep, -scores))[:k]].astype(np.int64, copy=False)
