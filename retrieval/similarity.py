"""Dot products whose bits do not depend on the BLAS library, its thread count or the batch.

A BLAS `matrix @ vector` splits the rows between its threads, and the rows at a split go through
another kernel that rounds differently in the last bit (OpenBLAS: 168 of 843,000 scores differed between
1 and 2 threads on the 16,859 x 384 Games catalog); a top-k cut over thousands of nearly equal scores
then picks a different ad now and then. numpy's einsum never calls BLAS and runs on one thread, so each
score is the same sum in the same order in every process (single, forked worker or Ray actor) and
whether the query is scored alone or with others. It costs about 1.4x a one-thread BLAS gemv.
"""
from __future__ import annotations

import numpy as np


def row_dots(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """(n,) = matrix (n, d) · vector (d,), without BLAS."""
    return np.einsum("ij,j->i", matrix, vector)


def pair_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) = a (n, d) · b (m, d)ᵀ, without BLAS."""
    return np.einsum("ij,kj->ik", a, b)
