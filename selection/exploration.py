"""Exploration with exact propensities: which ads to serve, in which order, and with what probability.

A slate is drawn position by position. At position j the *pool* is the first `top_m` candidates of the
greedy order (the pipeline's own serving order, best first) that are not already served and that
`admissible(i, served_so_far)` accepts (eligibility, caps; it must be deterministic for the propensities
to be exact, and it sees the prefix so an advertiser cap can close after an ad of that advertiser).
Then one ad of the pool is drawn:

- `off`: the pool's first ad (probability 1): the greedy order, nothing randomised;
- `epsilon_greedy`: the pool's first ad with probability 1 - ε, else an ad of the pool uniformly,
  so P(i) = (1 - ε)·[i first] + ε / |pool|;
- `softmax` (Plackett–Luce over the fused scores): P(i) = exp(s_i / T) / Σ_pool exp(s / T).

Each served ad's `propensity` is its probability at its position *given the ads above it*; the slate's
probability is their product. `eval/ope.py` uses the prefix products (P of the first j ads) for slates —
the cascade / reward-interaction IPS — and the first propensity alone for k = 1.

Draws are seeded by `seed_key` (the request id, with the arm; `random.Random`, seeded from its SHA-256): the same request gets the same slate
on a retry and in a replay; `propensities_of()` recomputes the probability of any given slate, for the
policy that served it or for a target policy in off-policy evaluation.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Admissible = Callable[[int, tuple[int, ...]], bool]  # (candidate index, served prefix) -> may serve here


class ExplorationConfig(BaseModel):
    """Per-arm exploration. The default serves the greedy order with propensity 1.0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["off", "epsilon_greedy", "softmax"] = "off"
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="epsilon_greedy: probability of a uniform draw from the pool.")
    temperature: float = Field(1.0, gt=0.0, description="softmax: scores are divided by this (lower = greedier).")
    top_m: int = Field(5, ge=1, le=100, description="Pool size: the best admissible candidates not yet served.")

    @property
    def randomised(self) -> bool:
        return self.method != "off" and self.top_m > 1 and not (self.method == "epsilon_greedy" and self.epsilon == 0)


OFF = ExplorationConfig()


@dataclass(frozen=True, slots=True)
class Exploration:
    served: list[int]  # candidate indices, in served order
    propensities: list[float]  # P(served[j] at position j | served[:j])
    slate_propensity: float  # product of the above: P(this exact served list)


def seed_for(seed_key: str) -> int:
    """A 64-bit seed from a string, the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256(seed_key.encode("utf-8")).digest()[:8], "big")


def pool_at(
    order: Sequence[int], prefix: Sequence[int], *, top_m: int, admissible: Admissible | None = None
) -> list[int]:
    """The candidates one position may draw from: the first `top_m` admissible ones of `order` not in `prefix`."""
    taken = set(prefix)
    pre = tuple(prefix)
    pool: list[int] = []
    for i in order:
        if i in taken or (admissible is not None and not admissible(i, pre)):
            continue
        pool.append(i)
        if len(pool) >= top_m:
            break
    return pool


def step_probabilities(pool: Sequence[int], scores: Sequence[float] | None, config: ExplorationConfig) -> list[float]:
    """P(each pool member) at one position; the pool is in greedy order. (Plain floats: pools are small.)"""
    n = len(pool)
    if n == 0:
        return []
    if config.method == "off" or n == 1:
        return [1.0] + [0.0] * (n - 1)
    if config.method == "epsilon_greedy":
        p = [config.epsilon / n] * n
        p[0] += 1.0 - config.epsilon
        return p
    if config.method == "softmax":
        if scores is None:
            raise ValueError("softmax exploration needs scores")
        z = [float(scores[i]) / config.temperature for i in pool]
        top = max(z)
        w = [math.exp(v - top) for v in z]
        total = math.fsum(w)
        return [v / total for v in w]
    raise ValueError(f"unknown exploration method {config.method!r}")


def draw(p: Sequence[float], u: float) -> int:
    """The index whose cumulative-probability interval holds `u` in [0, 1); never a zero-probability index."""
    acc = 0.0
    last = 0
    for j, pj in enumerate(p):
        if pj <= 0.0:
            continue
        acc += pj
        last = j
        if u < acc:
            return j
    return last  # u beyond a sum that rounded below 1


def explore(
    *,
    order: Sequence[int],
    scores: Sequence[float] | None,
    k: int,
    config: ExplorationConfig,
    seed_key: str,
    admissible: Admissible | None = None,
) -> Exploration:
    """Draw up to `k` ads (fewer when the pool runs dry) with their exact propensities."""
    m = config.top_m if config.method != "off" else 1
    rng = random.Random(seed_for(seed_key)) if config.randomised else None
    served: list[int] = []
    props: list[float] = []
    while len(served) < k:
        pool = pool_at(order, served, top_m=m, admissible=admissible)
        if not pool:
            break
        p = step_probabilities(pool, scores, config)
        j = draw(p, rng.random()) if rng is not None and len(pool) > 1 else 0
        served.append(pool[j])
        props.append(p[j])
    return Exploration(served, props, math.prod(props))


def propensities_of(
    served: Sequence[int],
    *,
    order: Sequence[int],
    scores: Sequence[float] | None,
    config: ExplorationConfig,
    admissible: Admissible | None = None,
) -> list[float]:
    """P(served[j] at position j | served[:j]) under `config`, for a given slate (0.0 where it could not occur)."""
    m = config.top_m if config.method != "off" else 1
    out: list[float] = []
    for j, ad in enumerate(served):
        pool = pool_at(order, served[:j], top_m=m, admissible=admissible)
        p = step_probabilities(pool, scores, config)
        out.append(p[pool.index(ad)] if ad in pool else 0.0)
    return out

