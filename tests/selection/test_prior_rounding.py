"""The priors a candidate reports are round(v, 6) of its float32 features, bit for bit, computed in one
numpy pass (selection.pipeline.rounded_priors)."""
from __future__ import annotations

import numpy as np
import pytest

from selection.pipeline import rounded_priors


def test_rounded_priors_equal_python_round_bit_for_bit():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = (np.arange(-20_000, 20_000) + 0.5) / 1e6  # at (or, in float32, beside) every tie of 6 decimals
    edges = [0.0, -0.0, 5e-7, -5e-7, 1.5e-6, 2.5e-6, -4e-7, 3.4e38, -3.4e38, 1e-45, np.inf, -np.inf]
    x = np.concatenate([edges, x[np.isfinite(x)], halves, rng.normal(0, 3, 50_000)]).astype(np.float32)
    m = x[: len(x) // 11 * 11].reshape(-1, 11)
    got = np.asarray(rounded_priors(m), dtype=np.float64)
    want = np.asarray([[round(v, 6) for v in row] for row in m.tolist()], dtype=np.float64)
    assert got.view(np.uint64).tobytes() == want.view(np.uint64).tobytes()  # signed zeros included


def test_rounded_priors_refuses_other_dtypes():
    with pytest.raises(TypeError):
        rounded_priors(np.zeros((2, 3), dtype=np.float64))
