"""The oracle: behaviour learning as it was before the vectorised version (commit 8702a40), copied verbatim
except for `dtype`, the type of the per-pair weights (float32 as shipped; float64 gives the exact sums), and
`timings` (the bench's seconds before the SVD) and `cf_dims=None` (no SVD, for the exact-sum comparison).

A pure-Python loop over every (position, gap) pair of every history: slow, but obviously what the docs say.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def reference_learn(
    histories: Sequence[Sequence[str]],
    ids: list[str],
    *,
    window: int,
    decay: float,
    cf_dims: int | None = 64,
    dtype=np.float32,
    timings: dict | None = None,
) -> dict:
    import time

    t0 = time.perf_counter()
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
    fwd = sp.csr_matrix((np.asarray(vals, dtype=dtype), (rows, cols)), shape=(n, n))
    fwd.sum_duplicates()
    sym = (fwd + fwd.T).tocsr()
    if timings is not None:
        timings["count_s"] = time.perf_counter() - t0
    cf = reference_collaborative_vectors(baskets, n, dims=cf_dims) if cf_dims is not None else None
    return {"popularity": pop.astype(np.float32), "forward": fwd, "symmetric": sym, "n_histories": used, "cf": cf}


def reference_collaborative_vectors(baskets: Sequence[Sequence[int]], n: int, *, dims: int) -> np.ndarray | None:
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
