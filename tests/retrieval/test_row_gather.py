"""The prior stage's per-row helpers keep their bits: one gather of a history's co-visitation rows mixed
with several weightings equals the position-array mix it replaced and an in-order reference sum, and the catalog's
row lookup keeps known rows and unknown ids in input order."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from kernel.types import Ad
from retrieval.features import _RowGather
from retrieval.store import CatalogIndex


def _position_array_mix(matrix: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mix the gather replaced (retrieval.features before it), kept here as the bit-for-bit oracle."""
    indptr = matrix.indptr
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(matrix.shape[1], dtype=np.float32)
    offsets = np.cumsum(lens) - lens
    pos = np.arange(total) + np.repeat(starts - offsets, lens)
    vals = matrix.data[pos] * np.repeat(np.asarray(weights, dtype=matrix.data.dtype), lens)
    return np.bincount(matrix.indices[pos], weights=vals, minlength=matrix.shape[1]).astype(np.float32)


def _reference(matrix: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i weights[i] * matrix[rows[i]], accumulated entry by entry in row order (bincount's order)."""
    out = [0.0] * matrix.shape[1]
    w = np.asarray(weights, dtype=matrix.data.dtype)
    for r, wr in zip(rows.tolist(), w.tolist()):
        lo, hi = matrix.indptr[r], matrix.indptr[r + 1]
        for col, v in zip(matrix.indices[lo:hi].tolist(), matrix.data[lo:hi].tolist()):
            out[col] += float(np.asarray(v, dtype=matrix.data.dtype) * np.asarray(wr, dtype=matrix.data.dtype))
    return np.asarray(out, dtype=np.float64).astype(np.float32)


def test_shared_gather_equals_separate_mixes_bit_for_bit():
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        m = sp.random(60, 80, density=0.2, format="csr", random_state=3, dtype=dtype)
        m.data = (m.data * 1000).astype(dtype)
        for n in (0, 1, 5, 12):
            rows = rng.integers(0, 60, size=n).astype(np.int64)  # repeats included
            w1 = rng.random(n).astype(np.float32)
            w2 = (w1 / np.sqrt(rng.random(n) + 1.0)).astype(np.float32)
            g = _RowGather(m, rows)
            for w in (w1, w2):
                shared = g.mix(w).astype(np.float32)
                assert shared.tobytes() == _position_array_mix(m, rows, w).tobytes()
                assert shared.tobytes() == _reference(m, rows, w).tobytes()
    empty = sp.csr_matrix((4, 6), dtype=np.float32)
    assert _RowGather(empty, np.array([1, 2])).mix(np.ones(2, dtype=np.float32)).tobytes() == np.zeros(6, np.float32).tobytes()


def _index(ids: list[str]) -> CatalogIndex:
    ads = [Ad(ad_id=i, title=i, text="", category="c", subcategory="", advertiser="a", bid=1.0, landing_url="") for i in ids]
    return CatalogIndex(ids=ids, row={a: r for r, a in enumerate(ids)}, ads=ads, vectors=np.zeros((len(ids), 2), np.float32), content_hash="h")


def test_rows_keeps_input_order_of_known_and_unknown():
    index = _index(["a", "b", "c"])
    assert index.rows(["c", "x", "a", "c", "y", "x"]) == ([2, 0, 2], ["x", "y", "x"])
    assert index.rows(["b", "a"]) == ([1, 0], [])
    assert index.rows(iter(["z", "b"])) == ([1], ["z"])  # any iterable, read once
    assert index.rows(dict.fromkeys(["c", "q", "c"])) == ([2], ["q"])
    assert index.rows([]) == ([], [])
