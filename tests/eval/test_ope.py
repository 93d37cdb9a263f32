"""Off-policy estimators, pinned against hand-computed cases, the textbook formulas and Open Bandit Pipeline."""
from __future__ import annotations

import numpy as np
import pytest

from eval.ope import LOW_ESS, LoggedData, estimate, evaluate_records, logged_data_from_records, prefix_weights

R = [1, 0, 1, 0]
PB = [0.5, 0.25, 0.5, 1.0]
PE = [1, 1, 0, 1]
QB = [0.4, 0.2, 0.3, 0.1]
QE = [0.6, 0.5, 0.2, 0.1]


def test_hand_computed_bandit_case() -> None:
    res = estimate(LoggedData(R, PB, PE, QB, QE), n_bootstrap=200)
    # w = [2, 4, 0, 1]
    assert res.ips.value == pytest.approx(2 / 4)
    assert res.snips.value == pytest.approx(2 / 7)
    assert res.dr.value == pytest.approx((1.8 - 0.3 + 0.2 + 0.0) / 4)
    assert res.ess == pytest.approx(49 / 21) and res.n == 4 and res.k == 1
    clipped = estimate(LoggedData(R, PB, PE, QB, QE), clip=3.0, n_bootstrap=200)  # w = [2, 3, 0, 1]
    assert clipped.ips.value == pytest.approx(0.5)
    assert clipped.snips.value == pytest.approx(2 / 6)
    assert clipped.dr.value == pytest.approx((1.8 - 0.1 + 0.2 + 0.0) / 4)
    for e in (res.ips, res.snips, res.dr):
        assert e.ci[0] <= e.value <= e.ci[1]


def test_hand_computed_slate_case() -> None:
    # two impressions, two positions
    r = [[0, 1], [1, 0]]
    pb = [[0.5, 0.5], [0.25, 1.0]]
    pe = [[1, 1], [1, 0]]
    qb = [[0.1, 0.2], [0.3, 0.4]]
    qe = [[0.5, 0.6], [0.7, 0.8]]
    data = LoggedData(r, pb, pe, qb, qe)
    w = prefix_weights(data)  # [[2, 4], [4, 0]]
    assert w.tolist() == [[2, 4], [4, 0]]
    res = estimate(data, n_bootstrap=100)
    assert res.ips.value == pytest.approx((4 + 4) / 2)
    assert res.snips.value == pytest.approx(4 / 6 + 4 / 4)
    dr_rows = [0.5 + 2 * (0 - 0.1) + 2 * 0.6 + 4 * (1 - 0.2), 0.7 + 4 * (1 - 0.3) + 4 * 0.8 + 0]
    assert res.dr.value == pytest.approx(sum(dr_rows) / 2)
    assert res.ess == pytest.approx(16 / 16) and res.ess_by_position == pytest.approx([36 / 20, 1.0])


def synthetic_bandit(n: int, n_actions: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_actions))
    pi_b = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    action = np.array([rng.choice(n_actions, p=p) for p in pi_b])
    true_q = 1 / (1 + np.exp(-rng.normal(-1, 1, size=(n, n_actions))))
    reward = rng.binomial(1, true_q[np.arange(n), action]).astype(float)
    t_logits = 2 * logits + rng.normal(size=(n, n_actions))
    pi_e = np.exp(t_logits) / np.exp(t_logits).sum(1, keepdims=True)
    q_hat = np.clip(true_q + rng.normal(0, 0.1, size=true_q.shape), 0.01, 0.99)
    return action, reward, pi_b[np.arange(n), action], pi_e, q_hat


def test_bandit_estimators_match_open_bandit_pipeline() -> None:
    obp = pytest.importorskip("obp.ope")
    n, a = 3000, 6
    action, reward, pscore, pi_e, q_hat = synthetic_bandit(n, a, seed=7)
    rows = np.arange(n)
    data = LoggedData(
        reward, pscore, pi_e[rows, action], q_hat[rows, action], (pi_e * q_hat).sum(axis=1)
    )
    ours = estimate(data, n_bootstrap=50)
    kw = dict(reward=reward, action=action, pscore=pscore, action_dist=pi_e[:, :, None])
    assert ours.ips.value == pytest.approx(obp.InverseProbabilityWeighting().estimate_policy_value(**kw), rel=1e-12)
    assert ours.snips.value == pytest.approx(
        obp.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**kw), rel=1e-12
    )
    dr = obp.DoublyRobust().estimate_policy_value(**kw, estimated_rewards_by_reg_model=q_hat[:, :, None])
    assert ours.dr.value == pytest.approx(dr, rel=1e-12)


def synthetic_slates(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    pb = rng.uniform(0.05, 1.0, size=(n, k))
    pe = rng.uniform(0.0, 1.0, size=(n, k)) * (rng.random((n, k)) < 0.7)
    r = rng.binomial(1, 0.2, size=(n, k)).astype(float)
    qb = rng.uniform(0, 0.4, size=(n, k))
    qe = rng.uniform(0, 0.4, size=(n, k))
    return r, pb, pe, qb, qe


def test_slate_ips_matches_open_bandit_pipelines_reward_interaction_ips() -> None:
    obp = pytest.importorskip("obp.ope")
    n, k = 500, 3
    r, pb, pe, _, _ = synthetic_slates(n, k, seed=3)
    ours = estimate(LoggedData(r, pb, pe), n_bootstrap=20)
    rips = obp.SlateRewardInteractionIPS(len_list=k).estimate_policy_value(
        slate_id=np.repeat(np.arange(n), k),
        reward=r.ravel(),
        position=np.tile(np.arange(k), n),
        pscore_cascade=np.cumprod(pb, axis=1).ravel(),
        evaluation_policy_pscore_cascade=np.cumprod(pe, axis=1).ravel(),
    )
    assert ours.ips.value == pytest.approx(rips, rel=1e-12)


def test_slate_estimators_match_a_direct_transcription_of_the_formulas() -> None:
    n, k = 300, 3
    r, pb, pe, qb, qe = synthetic_slates(n, k, seed=5)
    ours = estimate(LoggedData(r, pb, pe, qb, qe), n_bootstrap=20)
    ips = dr = 0.0
    num, den = [0.0] * k, [0.0] * k
    for i in range(n):
        w_prev = 1.0
        for j in range(k):
            w = w_prev * pe[i][j] / pb[i][j]
            ips += w * r[i][j]
            dr += w_prev * qe[i][j] + w * (r[i][j] - qb[i][j])
            num[j] += w * r[i][j]
            den[j] += w
            w_prev = w
    assert ours.ips.value == pytest.approx(ips / n, rel=1e-12)
    assert ours.dr.value == pytest.approx(dr / n, rel=1e-12)
    assert ours.snips.value == pytest.approx(sum(a / b for a, b in zip(num, den)), rel=1e-12)


def test_on_policy_data_gives_the_mean_reward_full_ess_and_a_ci_that_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    r = rng.binomial(1, 0.3, size=4000).astype(float)
    p = rng.uniform(0.2, 1.0, size=4000)
    res = estimate(LoggedData(r, p, p), n_bootstrap=500)
    assert res.ips.value == pytest.approx(r.mean()) and res.snips.value == pytest.approx(r.mean())
    assert res.ess == pytest.approx(4000)
    small = estimate(LoggedData(r[:400], p[:400], p[:400]), n_bootstrap=500)
    assert (res.ips.ci[1] - res.ips.ci[0]) < (small.ips.ci[1] - small.ips.ci[0])
    again = estimate(LoggedData(r, p, p), n_bootstrap=500)
    assert again.ips.ci == res.ips.ci  # seeded
    assert res.warnings == [] and res.to_json()["warnings"] == []


def test_an_estimate_its_interval_cannot_back_says_so() -> None:
    """A target that agrees with the logging policy on a few impressions, none of them rewarded: SNIPS's
    bootstrap interval is [0, 0] whatever the truth, and the result warns about both causes."""
    n = 400
    r = np.zeros(n)
    r[::10] = 1.0  # rewards exist, but only where the target has no weight
    pb = np.full(n, 0.05)
    pe = np.zeros(n)
    pe[1:6] = 1.0  # 5 impressions of weight 20: ESS 5
    res = estimate(LoggedData(r, pb, pe), n_bootstrap=300)
    assert res.snips.ci == (0.0, 0.0) and res.ess == pytest.approx(5) and 5 < LOW_ESS
    assert [w.split(":")[0] for w in res.warnings] == ["low_ess", "no_reward_in_support"]
    pe[10] = 1.0  # one rewarded impression in the support: the interval is no longer degenerate
    res = estimate(LoggedData(r, pb, pe), n_bootstrap=300)
    assert res.snips.ci[1] > 0 and [w.split(":")[0] for w in res.warnings] == ["low_ess"]


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError):
        LoggedData([1, 0], [0.5, 0.0], [1, 1])  # a zero logging propensity
    with pytest.raises(ValueError):
        LoggedData([1, 0], [0.5, 1.0], [1, 1], [0.1, 0.1], None)  # half a direct model
    with pytest.raises(ValueError):
        LoggedData([[1, 0]], [0.5, 1.0], [1, 1])


def record(rid: str, served: list[tuple[str, float, float]], clicked: list[str], scored_pctr: dict[str, float]) -> dict:
    return {
        "request_id": rid,
        "served": [a for a, _, _ in served],
        "served_ads": [{"ad_id": a, "position": i, "propensity": p, "bid": b, "pctr": scored_pctr.get(a)}
                       for i, (a, p, b) in enumerate(served)],
        "scored": [{"ad_id": a, "priors": {}, "pctr": q} for a, q in scored_pctr.items()],
        "clicked": clicked,
    }


def test_from_records_with_a_deterministic_target() -> None:
    recs = [
        record("r1", [("a", 0.5, 2.0), ("b", 0.5, 1.0)], ["a"], {"a": 0.3, "b": 0.2, "c": 0.1}),
        record("r2", [("c", 0.25, 1.0), ("a", 1.0, 2.0)], ["a"], {"a": 0.3, "b": 0.2, "c": 0.1}),
        record("r3", [("b", 1.0, 1.0)], [], {"b": 0.2}),  # one ad only: skipped at k = 2
    ]
    target = lambda rec: ["a", "b", "c"]  # noqa: E731
    data, skipped = logged_data_from_records(recs[:2], target=target, k=1)
    assert data.target_propensity[:, 0].tolist() == [1.0, 0.0] and skipped == 0
    res = evaluate_records(recs, target=target, k=1, n_bootstrap=50)
    assert res.ips.value == pytest.approx((1 / 0.5 + 0 + 0) / 3)  # r3: target serves a, logged b: weight 0
    # r1: q(a) + 2·(1 − q(a)); r2: q(a) + 0; r3: the target's ad a was not scored there, q = 0
    assert res.dr.value == pytest.approx((0.3 + 2 * (1 - 0.3) + 0.3 + 0.0) / 3)
    rev = evaluate_records(recs[:2], target=target, k=1, reward="revenue", direct=None, n_bootstrap=50)
    assert rev.ips.value == pytest.approx(2.0 * 2 / 2) and rev.dr is None
    slate = evaluate_records(recs, target=target, k=2, n_bootstrap=50)
    assert slate.skipped == 1 and slate.n == 2
    assert slate.ips.value == pytest.approx((2 * 1 + 4 * 0) / 2)  # r1: a then b, both the target's choices
