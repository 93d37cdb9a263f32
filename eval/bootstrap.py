"""The one bootstrap of eval/: resample impressions with replacement, read percentile intervals.

- `resamples(n, n_boot=, seed=)`: index matrices of resampled impressions, in chunks of bounded size.
  Every statistic that resamples (the ranking metrics' means, pooled calibration log loss, the LLM
  weight refits in eval.tune) draws its replicates here, so the same seed gives the same resamples.
- `percentile_interval(values, level)`: the percentile interval of replicate statistics.
- `mean_with_ci` / `paired_diff`: the mean of per-impression values and its interval. A mean over few
  distinct values (binary hits, 1/rank) draws the counts of each value directly (Multinomial), which
  is the same distribution as resampling indices at a fraction of the cost.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

CHUNK_ELEMENTS = 4_000_000  # resampled indices held in memory at once


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def resamples(
    n: int, *, n_boot: int, rng: np.random.Generator, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[np.ndarray]:
    """`n_boot` resamples of range(n) with replacement, as (rows, n) index matrices (rows summing to n_boot)."""
    step = max(1, chunk_elements // max(1, n))
    for start in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(n_boot, start + step) - start, n))


def percentile_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_means(x: np.ndarray, *, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot means of size-n resamples of x drawn with replacement."""
    n = x.size
    values, counts = np.unique(x, return_counts=True)
    if values.size * 16 <= n:
        return rng.multinomial(n, counts / n, size=n_boot) @ values / n
    return np.concatenate([x[idx].mean(axis=1) for idx in resamples(n, n_boot=n_boot, rng=rng)])


def _mean_ci(x: np.ndarray, *, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    _check(n_boot, level)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = percentile_interval(bootstrap_means(x, n_boot=n_boot, rng=np.random.default_rng(seed)), level)
    return float(x.mean()), lo, hi


def mean_with_ci(
    values: Iterable[float | None], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the defined values and its percentile-bootstrap interval.

    None values are skipped; with no defined value the result is (nan, nan, nan).
    """
    x = np.fromiter((v for v in values if v is not None), dtype=np.float64)
    return _mean_ci(x, n_boot=n_boot, seed=seed, level=level)


def paired_diff(
    a_values: Sequence[float | None],
    b_values: Sequence[float | None],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi) over impressions where both values are defined (paired bootstrap).

    The two sequences are aligned per impression and must have the same length.
    """
    if len(a_values) != len(b_values):
        raise ValueError(f"paired values differ in length: {len(a_values)} vs {len(b_values)}")
    diffs = np.fromiter(
        (a - b for a, b in zip(a_values, b_values) if a is not None and b is not None), dtype=np.float64
    )
    return _mean_ci(diffs, n_boot=n_boot, seed=seed, level=level)
