"""The full-catalog and candidate dot products, in one place.

They go through BLAS (`matrix @ vector`), pinned to `settings.blas_threads` threads in every process that
scores (selection.services.build_services: the endpoint's workers, eval, tune and every Ray actor). The
last bits of a BLAS gemv depend on its thread count (the rows split between threads go through other
kernels: 168 of 843,000 Games scores differed between 1 and 2 threads), and a top-k cut over thousands of
nearly equal scores then picks another ad now and then; at one pinned count every process gets the same
bits, so a Ray run ranks exactly as one process does. A BLAS-free einsum would not depend on the count
but cost 2.5-3.5 ms of server CPU per Games request (capacity 175 -> 130 req/s under bench_wrk), so the
pinning is the rule. Processes with a different ADSELECT_BLAS_THREADS may break near ties differently.
"""
from __future__ import annotations

import numpy as np


def row_dots(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """(n,) = matrix (n, d) · vector (d,)."""
    return matrix @ vector


def row_dots_by_row(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """(n,) = matrix (n, d) · vector (d,), each row's sum by the same loop wherever the row sits in `matrix` (numpy's
    own einsum, no BLAS): a row scores the same bits in any subset of rows, which a BLAS gemv does not promise (its
    rows at a block's edge go through other kernels). For short subsets (retrieval.projected_search's re-scoring);
    over the full catalog it costs about 2x the gemv."""
    return np.einsum("ij,j->i", matrix, vector, optimize=False)


def pair_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) = a (n, d) · b (m, d)ᵀ."""
    return a @ b.T
