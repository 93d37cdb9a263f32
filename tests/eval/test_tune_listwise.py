"""The listwise (softmax) fusion objective of `eval tune`: its gradient, and that it fits the ranking."""
from __future__ import annotations

import numpy as np
import pytest

from eval.tune import TrainingSet, fit_fusion, listwise_softmax_loss


def _lists(n_imp: int, per: int, seed: int) -> TrainingSet:
    """Impressions whose click is the row with the highest x0 + x1 among its list, each list shifted by its
    own offset in x0 (so x0's level says nothing about a click: only its order within the list does)."""
    rng = np.random.default_rng(seed)
    from retrieval.features import FEATURES

    X = rng.normal(size=(n_imp * per, len(FEATURES)))
    group = np.repeat(np.arange(n_imp), per)
    X[:, 0] += np.repeat(rng.normal(scale=3.0, size=n_imp), per)  # list-level shift
    util = X[:, 0] - np.repeat(X[:, 0].reshape(n_imp, per).mean(axis=1), per) + X[:, 1] + rng.gumbel(size=len(group))
    y = np.zeros(len(group))
    y[np.arange(n_imp) * per + util.reshape(n_imp, per).argmax(axis=1)] = 1.0
    return TrainingSet(X, y, group, n_imp, 0, [f"u{i}" for i in range(n_imp)], np.full(n_imp, per - 1.0), np.full(n_imp, per - 1.0))


def test_listwise_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(30, 4))
    y = np.zeros(30)
    y[[0, 11, 12, 25]] = 1.0  # impression 1 has two clicks
    group = np.repeat(np.arange(3), 10)
    w = rng.normal(size=4)
    loss, grad = listwise_softmax_loss(w, Z, y, group, l2=0.01)
    eps = 1e-6
    num = [(listwise_softmax_loss(w + eps * e, Z, y, group, l2=0.01)[0] - listwise_softmax_loss(w - eps * e, Z, y, group, l2=0.01)[0]) / (2 * eps) for e in np.eye(4)]
    assert np.allclose(grad, num, atol=1e-6)
    assert loss > 0


def test_softmax_fit_ranks_within_lists_better_than_the_pointwise_fit() -> None:
    """The listwise fit minimises the per-impression ranking loss, so on held-out lists its top pick is the
    click at least as often as the pointwise logistic fit's, and its listwise loss is lower."""
    train, test = _lists(400, 10, seed=0), _lists(400, 10, seed=1)

    def top1(model) -> float:
        s = model.prior_scores(test.X).reshape(400, 10)
        return float((test.y.reshape(400, 10)[np.arange(400), s.argmax(axis=1)]).mean())

    def list_loss(model) -> float:
        return listwise_softmax_loss(model.coef, model.expand(test.X), test.y, test.group, l2=0.0)[0]

    pointwise = fit_fusion(train, interactions=False, objective="logistic")
    listwise = fit_fusion(train, interactions=False, objective="softmax")
    assert listwise.meta["objective"] == "softmax" and listwise.meta["objective_fit"]["converged"]
    assert listwise.intercept == 0.0
    assert list_loss(listwise) < list_loss(pointwise)
    assert top1(listwise) >= top1(pointwise)


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError):
        fit_fusion(_lists(10, 5, seed=0), objective="pairwise-magic")


def test_each_list_is_ranked_on_its_own_and_subsets_keep_lists_apart() -> None:
    """Rows of one impression in two lists (the sampled list and the retrieved list): the softmax ranks each
    list within itself, and a calibration subset renumbers the lists it keeps."""
    ts = _lists(60, 10, seed=2)
    ts.lists = np.repeat(np.arange(120), 5)  # each impression's 10 rows as two lists of 5
    ts.y = np.zeros(len(ts.y))
    ts.y[np.arange(120) * 5] = 1.0  # one click per list
    sub = ts.subset(np.arange(60) % 3 == 0)
    assert sorted(set(sub.lists.tolist())) == list(range(40)) and len(sub.y) == 200
    model = fit_fusion(ts, interactions=False, objective="softmax")
    assert model.meta["objective_fit"]["lists"] == 120  # lists, not impressions


def test_a_fit_stopped_by_its_iteration_cap_says_so_instead_of_failing() -> None:
    """The 40,000-user tune hit the cap and its warning crashed (a reserved LogRecord key): the fit returns
    its coefficients with converged False."""
    from eval.tune import fit_listwise_softmax

    ts = _lists(50, 6, seed=3)
    coef, info = fit_listwise_softmax(ts.X, ts.y, ts.group, max_iter=1)
    assert info["converged"] is False and info["iterations"] == 1 and np.isfinite(coef).all()
