"""Exploration: the propensities are exact (they sum to 1 over every outcome, and draws follow them)."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from selection.exploration import ExplorationConfig, explore, propensities_of

SCORES = [2.0, 1.5, 0.3, 1.0, -0.5]
ORDER = [0, 1, 3, 2, 4]  # greedy: by score
ADVERTISER = ["x", "y", "y", "z", "x"]


def one_per_advertiser(i: int, prefix: tuple[int, ...]) -> bool:
    """An advertiser cap of one ad per slate, and ad 2 is never eligible."""
    return i != 2 and ADVERTISER[i] not in {ADVERTISER[j] for j in prefix}


CONFIGS = [
    ExplorationConfig(method="softmax", temperature=0.7, top_m=4),
    ExplorationConfig(method="softmax", temperature=2.0, top_m=2),
    ExplorationConfig(method="epsilon_greedy", epsilon=0.3, top_m=3),
    ExplorationConfig(method="epsilon_greedy", epsilon=1.0, top_m=5),
]


def slate_probability(slate, config, admissible=None) -> float:
    return math.prod(propensities_of(slate, order=ORDER, scores=SCORES, config=config, admissible=admissible))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.top_m}")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_slate_probabilities_sum_to_one_over_every_outcome(config: ExplorationConfig, k: int) -> None:
    total = sum(slate_probability(s, config) for s in itertools.permutations(range(5), k))
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.top_m}")
def test_with_rules_an_outcome_may_be_shorter_and_probabilities_still_sum_to_one(config: ExplorationConfig) -> None:
    # admissible ads: 0 (x), 1 (y), 3 (z), 4 (x): at most three advertisers, so a k=3 slate is always full
    outcomes = [s for s in itertools.permutations(range(5), 3)]
    probs = {s: slate_probability(s, config, one_per_advertiser) for s in outcomes}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(p == 0.0 for s, p in probs.items() if 2 in s or {0, 4} <= set(s))


def test_hand_computed_softmax_and_epsilon_greedy() -> None:
    sm = ExplorationConfig(method="softmax", temperature=1.0, top_m=3)
    e = math.e
    # pool at position 0: ads 0, 1, 3 (scores 2, 1.5, 1); at position 1 after ad 1: ads 0, 3, 2
    p = propensities_of([1, 3], order=ORDER, scores=SCORES, config=sm)
    assert p == pytest.approx([e**1.5 / (e**2 + e**1.5 + e**1), e**1 / (e**2 + e**1 + e**0.3)], rel=1e-14)
    eg = ExplorationConfig(method="epsilon_greedy", epsilon=0.2, top_m=4)
    assert propensities_of([0, 3], order=ORDER, scores=None, config=eg) == pytest.approx([0.8 + 0.05, 0.05])
    assert propensities_of([2], order=ORDER, scores=None, config=ExplorationConfig(method="epsilon_greedy", top_m=2)) == [0.0]


def test_off_serves_the_greedy_admissible_order_with_propensity_one() -> None:
    out = explore(order=ORDER, scores=SCORES, k=3, config=ExplorationConfig(), seed_key="r", admissible=one_per_advertiser)
    assert out.served == [0, 1, 3] and out.propensities == [1.0, 1.0, 1.0] and out.slate_propensity == 1.0
    short = explore(order=[0, 4], scores=SCORES, k=3, config=CONFIGS[0], seed_key="r", admissible=one_per_advertiser)
    assert short.served == [0] or short.served == [4]  # one advertiser: the pool runs dry after one ad


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"{c.method}-{c.top_m}")
def test_draws_follow_the_propensities(config: ExplorationConfig) -> None:
    n, k = 12000, 2
    seen: Counter = Counter()
    for r in range(n):
        out = explore(order=ORDER, scores=SCORES, k=k, config=config, seed_key=f"arm:{r}")
        if r < 300:
            assert out.propensities == propensities_of(out.served, order=ORDER, scores=SCORES, config=config)
        assert out.slate_propensity == pytest.approx(math.prod(out.propensities), rel=1e-15)
        seen[tuple(out.served)] += 1
    support = [s for s in itertools.permutations(range(5), k) if slate_probability(s, config) > 0]
    assert set(seen) <= set(support)
    expected = np.array([slate_probability(s, config) for s in support]) * n
    observed = np.array([seen[s] for s in support])
    # seeded, so the statistic is fixed. Power: a propensity 20% off on an outcome of probability 0.1 adds
    # n·0.1·0.2² = 48 to the statistic (df < 20): p < 1e-4.
    assert chisquare(observed, expected).pvalue > 1e-3


def test_the_same_request_gets_the_same_slate() -> None:
    a = [explore(order=ORDER, scores=SCORES, k=3, config=CONFIGS[0], seed_key="req-1").served for _ in range(3)]
    assert a[0] == a[1] == a[2]
    others = {tuple(explore(order=ORDER, scores=SCORES, k=3, config=CONFIGS[0], seed_key=f"req-{i}").served) for i in range(50)}
    assert len(others) > 1


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    for bad in ({"method": "thompson"}, {"epsilon": 1.5}, {"temperature": 0}, {"top_m": 0}, {"eps": 0.1}):
        with pytest.raises(ValidationError):
            ExplorationConfig.model_validate(bad)
