from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import ndcg_score, roc_auc_score

from kernel.errors import UnknownName
from eval.metrics import (
    METRIC_NAMES,
    auc,
    get_metric,
    hit_at,
    impression_metrics,
    locate,
    mean_with_ci,
    mrr,
    ndcg_at,
    paired_diff,
    recall_at,
)

ABCDE = ["a", "b", "c", "d", "e"]
LOG2_3 = math.log2(3)  # 1.5849625


# --- hand-computed cases -------------------------------------------------------------------


def test_one_click_at_rank_two():
    m = impression_metrics(ABCDE, {"b"}, names=METRIC_NAMES)
    # b is above c, d, e and below a: 3 of the 4 (clicked, non-clicked) pairs are right.
    assert m["auc"] == pytest.approx(3 / 4)
    assert m["mrr"] == pytest.approx(1 / 2)
    assert m["ndcg@1"] == 0.0
    # DCG = 1/log2(2+1); IDCG over min(5, 1) = 1 click = 1/log2(2) = 1.
    assert m["ndcg@5"] == pytest.approx(1 / LOG2_3)  # 0.6309
    assert m["hit@1"] == 0.0 and m["hit@5"] == 1.0
    assert m["recall@20"] == 1.0


def test_two_clicks():
    ranking, clicked = ABCDE, {"a", "d"}
    # negatives b, c, e. a beats all 3, d beats only e: (3 + 1) / (2 * 3) = 2/3.
    assert auc(ranking, clicked) == pytest.approx(2 / 3)
    assert mrr(ranking, clicked) == 1.0
    # DCG@5 = 1/log2(2) + 1/log2(5) = 1 + 0.4307 = 1.4307; IDCG = 1 + 1/log2(3) = 1.6309 -> 0.8772.
    assert ndcg_at(5)(ranking, clicked) == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / LOG2_3))
    # IDCG@1 counts min(1, 2) = 1 click: DCG@1 = 1 / 1.
    assert ndcg_at(1)(ranking, clicked) == 1.0
    # top 3 = a, b, c: 1 of 2 clicks.
    assert recall_at(3)(ranking, clicked) == 0.5
    assert hit_at(1)(ranking, clicked) == 1.0


def test_missing_clicked_counts_as_ranked_last():
    ranking, clicked = ["a", "b", "c"], {"c", "z"}  # z never ranked: position 4 of a pool of 4
    # negatives a, b are both above c and above z: 0 of 4 pairs right.
    assert auc(ranking, clicked) == 0.0
    assert mrr(ranking, clicked) == pytest.approx(1 / 3)
    # DCG@5 = 1/log2(4) + 1/log2(5) = 0.5 + 0.4307; IDCG = 1 + 1/log2(3).
    assert ndcg_at(5)(ranking, clicked) == pytest.approx((0.5 + 1 / math.log2(5)) / (1 + 1 / LOG2_3))
    assert recall_at(3)(ranking, clicked) == 0.5
    assert hit_at(3)(ranking, clicked) == 1.0


def test_pool_size_puts_missing_clicks_at_the_bottom_of_the_pool():
    ranking, clicked = ["a", "b", "c"], {"c", "z"}
    # pool of 10: a b c, then 6 unranked non-clicked (positions 4-9), then z at 10. 8 negatives.
    # c beats the 6 unranked, z beats none: 6 / (2 * 8) = 0.375.
    assert auc(ranking, clicked, pool_size=10) == pytest.approx(0.375)
    # DCG@5 = 1/log2(4) = 0.5 (z at 10 is outside); IDCG = 1 + 1/log2(3).
    assert ndcg_at(5)(ranking, clicked, pool_size=10) == pytest.approx(0.5 / (1 + 1 / LOG2_3))
    assert recall_at(9)(ranking, clicked, pool_size=10) == 0.5


def test_short_list_earns_no_credit_beyond_its_length_with_pool_size():
    top50 = [f"n{i}" for i in range(50)]
    # Without pool_size the missed click sits at position 51, inside the top 100.
    assert recall_at(100)(top50, {"x"}) == 1.0
    assert recall_at(100)(top50, {"x"}, pool_size=10_000) == 0.0
    assert mrr(top50, {"x"}, pool_size=10_000) == pytest.approx(1 / 10_000)


def test_undefined_values_are_none():
    none_clicked = impression_metrics(ABCDE, set(), names=METRIC_NAMES)
    assert all(v is None for v in none_clicked.values())
    all_clicked = impression_metrics(ABCDE, set(ABCDE), names=METRIC_NAMES)
    assert all_clicked["auc"] is None
    assert all(v == 1.0 for k, v in all_clicked.items() if k != "auc")


def test_locate():
    p = locate(["a", "b", "c"], {"b", "y", "z"}, pool_size=6)
    assert p.ranks == (2, 5, 6) and p.pool == 6


def test_invalid_input():
    with pytest.raises(ValueError, match="repeats"):
        auc(["a", "b", "a"], {"a"})
    with pytest.raises(ValueError, match="pool_size"):
        auc(["a", "b"], {"z"}, pool_size=2)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at(0)


def test_registry_names_and_did_you_mean():
    assert METRIC_NAMES == (
        "auc", "mrr", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20",
        "hit@1", "hit@5", "hit@10", "recall@20", "recall@50", "recall@100",
    )  # fmt: skip
    assert get_metric("ndcg@10").name == "ndcg@10"
    with pytest.raises(UnknownName, match="Did you mean recall@20") as exc:
        impression_metrics(ABCDE, {"a"}, names=["auc", "recal@20"])
    assert exc.value.name == "recal@20" and exc.value.kind == "metric"
    with pytest.raises(UnknownName, match="Known: .*ndcg@10"):
        get_metric("precision")


def test_only_requested_metrics_in_order():
    assert list(impression_metrics(ABCDE, {"a"}, names=["mrr", "auc"])) == ["mrr", "auc"]


# --- pinned against scikit-learn ------------------------------------------------------------


def _random_case(rng: random.Random, *, n_missing: int = 0) -> tuple[list[str], set[str], list[int], list[float]]:
    """A ranking, its clicks, and the full-pool labels/scores sklearn needs (missing clicks lowest)."""
    n = rng.randint(2, 60)
    ranking = [f"n{i}" for i in range(n)]
    rng.shuffle(ranking)
    n_clicked = rng.randint(1, n - 1)
    clicked = set(rng.sample(ranking, n_clicked)) | {f"x{i}" for i in range(n_missing)}
    labels = [int(a in clicked) for a in ranking] + [1] * n_missing
    scores = [float(n + n_missing - i) for i in range(n + n_missing)]
    return ranking, clicked, labels, scores


@pytest.mark.parametrize("n_missing", [0, 2])
def test_auc_matches_sklearn(n_missing):
    rng = random.Random(7)
    for _ in range(200):
        ranking, clicked, labels, scores = _random_case(rng, n_missing=n_missing)
        assert auc(ranking, clicked) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("n_missing", [0, 2])
@pytest.mark.parametrize("k", [1, 5, 10, 20])
def test_ndcg_matches_sklearn(k, n_missing):
    rng = random.Random(11 + k)
    for _ in range(200):
        ranking, clicked, labels, scores = _random_case(rng, n_missing=n_missing)
        expected = ndcg_score([labels], [scores], k=k)
        assert ndcg_at(k)(ranking, clicked) == pytest.approx(expected, abs=1e-12)


def test_rank_metrics_match_brute_force():
    rng = random.Random(3)
    for _ in range(300):
        ranking, clicked, _, _ = _random_case(rng)
        first = min(i for i, a in enumerate(ranking, start=1) if a in clicked)
        assert mrr(ranking, clicked) == pytest.approx(1 / first)
        for k in (1, 5, 10, 50):
            top = set(ranking[:k])
            assert hit_at(k)(ranking, clicked) == float(bool(top & clicked))
            assert recall_at(k)(ranking, clicked) == pytest.approx(len(top & clicked) / len(clicked))


# --- properties -------------------------------------------------------------------------------


@st.composite
def impressions(draw, *, allow_missing: bool = True):
    n = draw(st.integers(1, 40))
    ranking = draw(st.permutations([f"n{i}" for i in range(n)]))
    clicked = set(draw(st.lists(st.sampled_from(ranking), max_size=n, unique=True)))
    if allow_missing:
        clicked |= {f"x{i}" for i in range(draw(st.integers(0, 3)))}
    return list(ranking), clicked


@given(impressions(), st.integers(0, 20))
def test_values_in_unit_interval(case, extra_pool):
    ranking, clicked = case
    pool = len(ranking) + len(clicked - set(ranking)) + extra_pool
    for value in impression_metrics(ranking, clicked, names=METRIC_NAMES, pool_size=pool).values():
        assert value is None or 0.0 <= value <= 1.0


@given(impressions())
def test_perfect_ranking(case):
    ranking, clicked = case
    perfect = sorted(clicked) + [a for a in ranking if a not in clicked]
    m = impression_metrics(perfect, clicked, names=METRIC_NAMES)
    if not clicked:
        return
    assert m["auc"] in (None, 1.0)
    assert m["mrr"] == 1.0
    assert all(m[f"ndcg@{k}"] == pytest.approx(1.0) for k in (1, 5, 10, 20))
    assert all(m[f"hit@{k}"] == 1.0 for k in (1, 5, 10))
    assert all(m[f"recall@{k}"] == min(k, len(clicked)) / len(clicked) for k in (20, 50, 100))


@given(impressions(allow_missing=False))
def test_reversing_complements_auc(case):
    ranking, clicked = case
    forward, backward = auc(ranking, clicked), auc(ranking[::-1], clicked)
    assert (forward is None) == (backward is None)
    if forward is not None:
        assert forward + backward == pytest.approx(1.0)


@given(impressions(allow_missing=False))
def test_worst_ranking(case):
    ranking, clicked = case
    worst = [a for a in ranking if a not in clicked] + sorted(clicked)
    assert auc(worst, clicked) in (None, 0.0)


@given(impressions(), st.randoms())
def test_missing_clicks_equal_appending_them_last(case, rnd):
    ranking, clicked = case
    missing = sorted(clicked - set(ranking))
    rnd.shuffle(missing)
    assert impression_metrics(ranking, clicked, names=METRIC_NAMES) == impression_metrics(
        ranking + missing, clicked, names=METRIC_NAMES
    )


@given(impressions(allow_missing=False), st.data())
def test_promoting_a_click_never_hurts(case, data):
    ranking, clicked = case
    pairs = [(i, j) for i in range(len(ranking)) for j in range(i) if ranking[i] in clicked and ranking[j] not in clicked]
    if not pairs:
        return
    i, j = data.draw(st.sampled_from(pairs))  # swap clicked ranking[i] with the non-clicked above it
    better = list(ranking)
    better[i], better[j] = better[j], better[i]
    before = impression_metrics(ranking, clicked, names=METRIC_NAMES)
    after = impression_metrics(better, clicked, names=METRIC_NAMES)
    for name in METRIC_NAMES:
        if before[name] is not None:
            assert after[name] >= before[name] - 1e-12, name


@given(impressions())
def test_cutoff_metrics_grow_with_k(case):
    ranking, clicked = case
    if clicked:
        assert hit_at(1)(ranking, clicked) <= hit_at(5)(ranking, clicked) <= hit_at(10)(ranking, clicked)
        assert recall_at(1)(ranking, clicked) <= recall_at(5)(ranking, clicked) <= recall_at(50)(ranking, clicked)


# --- the published random anchor ------------------------------------------------------------


def test_random_ranking_of_20_with_one_click_gives_the_published_ndcg10_anchor():
    """LLMRank's random baseline on 20 candidates with 1 relevant item: nDCG@10 ~ 0.227."""
    rng = np.random.default_rng(0)
    ids = [f"n{i}" for i in range(20)]
    ndcg10 = ndcg_at(10)
    values = [ndcg10([ids[i] for i in rng.permutation(20)], {"n0"}) for _ in range(20_000)]
    mean, lo, hi = mean_with_ci(values)
    assert mean == pytest.approx(0.227, abs=0.01)
    assert lo < mean < hi
    # Exact expectation: each rank 1..20 with probability 1/20, credit 1/log2(r+1) inside the top 10.
    exact = sum(1 / math.log2(r + 1) for r in range(1, 11)) / 20  # 4.5436 / 20 = 0.2272
    assert exact == pytest.approx(0.227, abs=0.001)
    standard_error = float(np.std(values)) / math.sqrt(len(values))  # sd ~ 0.27 -> ~0.0019
    assert abs(mean - exact) < 4 * standard_error


# --- aggregation ----------------------------------------------------------------------------


def test_mean_with_ci_skips_none():
    mean, lo, hi = mean_with_ci([1.0, None, 0.0, None, 1.0, 1.0])
    assert mean == pytest.approx(0.75)
    assert 0.0 <= lo <= mean <= hi <= 1.0


def test_mean_with_ci_degenerate_inputs():
    assert all(math.isnan(v) for v in mean_with_ci([None, None]))
    assert mean_with_ci([0.4] * 50) == pytest.approx((0.4, 0.4, 0.4))
    assert mean_with_ci([0.4]) == pytest.approx((0.4, 0.4, 0.4))
    with pytest.raises(ValueError):
        mean_with_ci([1.0], n_boot=0)


def test_mean_with_ci_is_seeded():
    values = list(np.random.default_rng(1).random(300))
    assert mean_with_ci(values, seed=5) == mean_with_ci(values, seed=5)
    assert mean_with_ci(values, seed=5) != mean_with_ci(values, seed=6)


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(2).binomial(1, 0.3, 5000).astype(float),  # few distinct values
        np.random.default_rng(3).random(2000),  # all distinct
        np.random.default_rng(4).binomial(1, 0.3, 20).astype(float),  # few values, few samples
    ],
    ids=["binary", "continuous", "small"],
)
def test_bootstrap_interval_matches_normal_theory(values):
    mean, lo, hi = mean_with_ci(list(values), n_boot=4000)
    half_width = 1.96 * values.std() / math.sqrt(values.size)
    assert mean == pytest.approx(values.mean())
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.2)
    assert lo < mean < hi


@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=1, max_size=60))
@settings(max_examples=50)
def test_interval_contains_mean(values):
    mean, lo, hi = mean_with_ci(values, n_boot=200)
    if all(v is None for v in values):
        assert math.isnan(mean)
    else:
        assert lo - 1e-12 <= mean <= hi + 1e-12


def test_paired_diff():
    rng = np.random.default_rng(5)
    base = rng.random(1000)
    a = list(base + 0.02 + rng.normal(0, 0.01, 1000))
    b = list(base)
    diff, lo, hi = paired_diff(a, b)
    assert diff == pytest.approx(0.02, abs=0.002)
    assert 0.0 < lo < diff < hi < 0.04
    # Unpaired, the per-impression spread of `base` (sd ~0.29) would swamp a 0.02 difference.
    _, a_lo, a_hi = mean_with_ci(a)
    assert (hi - lo) < (a_hi - a_lo) / 5


def test_paired_diff_uses_only_impressions_where_both_are_defined():
    diff, lo, hi = paired_diff([1.0, None, 0.5, 0.0], [0.0, 1.0, None, 0.0])
    # pairs (1.0, 0.0) and (0.0, 0.0): mean difference 0.5
    assert diff == pytest.approx(0.5)
    assert paired_diff([0.3, 0.7], [0.3, 0.7]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        paired_diff([1.0], [1.0, 0.0])


def test_revenue_at_sums_the_bids_of_clicked_ads_in_the_top_k() -> None:
    from eval.metrics import metrics_by_protocol, revenue_at

    bids = {"a": 1.0, "b": 2.0, "c": 0.5}
    assert [revenue_at(["a", "b", "c"], {"b", "c"}, bids, k=k) for k in (1, 2, 3, 9)] == [0.0, 2.0, 2.5, 2.5]
    assert revenue_at(["x"], {"x"}, bids, k=1) == 0.0  # a clicked id without a bid earns nothing

    class Imp:
        candidates, clicked = ["a", "b", "c"], frozenset({"b"})

    with_bids = metrics_by_protocol(["mrr"], ["mrr"], bids=bids, revenue_ks=(1, 2))(Imp(), {"s": ["b", "a", "c"]}, None)
    assert with_bids == {"s": {"mrr": 1.0, "revenue@1": 2.0, "revenue@2": 2.0}}
    assert metrics_by_protocol(["mrr"], ["mrr"])(Imp(), {"s": ["a", "b", "c"]}, None) == {"s": {"mrr": 0.5}}  # no bids: no revenue
