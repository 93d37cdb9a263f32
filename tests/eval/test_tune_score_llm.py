"""Scoring mode's LLM weight (`llm_score_coef`): the listwise fit machinery (eval.tune.fit_llm_term) over the
per-order label log-probability with the position-only LLM term as the control (eval.tune_score); then
`adselect eval tune --llm-mode score` against the real bundled llama.cpp server on a few demo impressions."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from adselect.cli import app
from eval.tune import fit_llm_term
from agent.scorer import permutations
from eval.tune_score import position_control
from kernel.settings import REPO_ROOT
from selection.fusion import FusionModel

DEMO = REPO_ROOT / "data" / "demo"


def _scored(*, informative: bool, p: int | str, canonical: bool = True, n_imp: int = 300, n: int = 6, seed: int = 0):
    """Synthetic scoring-mode logs over the scorer's own shown orders (agent.scorer.permutations, the candidates
    passed in prior order): the model prefers the first label it is shown (+2 logits, noise 0.5) and, when
    informative, the clicked candidate too (+2). Rows as eval.tune_score.score_rows makes them."""
    rng = np.random.default_rng(seed)
    prior, lp, y, groups, by_order = [], [], [], [], []
    for g in range(n_imp):
        s = np.sort(rng.normal(0, 1, n))[::-1]
        clicked = int(rng.choice(n, p=np.exp(s) / np.exp(s).sum()))
        shown: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        for order in permutations([f"i{g}-c{i}" for i in range(n)], p, seed_key=f"imp-{g}", canonical=canonical):
            logits = np.array([2.0 * (pos == 0) + 2.0 * (informative and i == clicked) for pos, i in enumerate(order)])
            logits += rng.normal(0, 0.5, n)
            norm = logits - np.log(np.exp(logits).sum())
            for pos, i in enumerate(order):
                shown[i].append((pos, float(norm[pos])))
        for i in range(n):
            prior += [s[i]] * len(shown[i])
            lp += [v for _, v in shown[i]]
            y += [float(i == clicked)] * len(shown[i])
            groups += [g] * len(shown[i])
        by_order += shown
    control, profile = position_control(by_order, [n] * len(by_order))
    return np.array(prior), np.array(lp), np.array(y), np.array(groups), control, profile


def test_position_control_is_the_position_only_term_per_shown_order() -> None:
    # one impression of 3 candidates shown in two orders; a second of 2 candidates
    by_order = [[(0, -0.1), (2, -3.0)], [(1, -2.0), (1, -2.0)], [(2, -3.0), (0, -0.1)], [(0, -0.5), (1, -1.0)], [(1, -1.0), (0, -0.5)]]
    control, profile = position_control(by_order, [3, 3, 3, 2, 2])
    assert profile == {"2:0": -0.5, "2:1": -1.0, "3:0": -0.1, "3:1": -2.0, "3:2": -3.0}
    # one value per (candidate, order): the profile at the position it was shown at
    assert control.tolist() == pytest.approx([-0.1, -3.0, -2.0, -2.0, -3.0, -0.1, -0.5, -1.0, -1.0, -0.5])


def test_under_the_balanced_design_the_averaged_control_is_constant_and_the_per_order_one_is_not() -> None:
    *_, control, profile = _scored(informative=False, p="all", n_imp=20)
    assert len(control) == 20 * 6 * 6  # every candidate in every order
    per_candidate = control.reshape(20 * 6, 6).mean(axis=1)
    assert np.ptp(per_candidate) < 1e-9  # a Latin square: a position-only model gives every candidate the same term
    assert np.ptp(control) > 1.0  # ... while per order the first position stands out (+2 logits)
    assert max(profile, key=profile.get) == "6:0"


@pytest.mark.parametrize(("p", "seed"), [("all", 0), ("all", 1), (2, 0), (2, 1)])
def test_under_the_balanced_design_a_first_label_echo_ships_zero_an_informative_scorer_ships(p: int | str, seed: int) -> None:
    prior, lp, y, groups, control, _ = _scored(informative=False, p=p, seed=seed, n_imp=80, n=5)
    w, info = fit_llm_term(prior, lp, y, groups=groups, position=control, n_boot=20, seed=seed)
    assert w == 0.0 and info["shipped"]["fit"] == "position_control" and info["shipped"]["weight"] == 0.0, info["shipped"]
    prior, lp, y, groups, control, _ = _scored(informative=True, p=p, seed=seed, n_imp=80, n=5)
    w, info = fit_llm_term(prior, lp, y, groups=groups, position=control, n_boot=20, seed=seed)
    pc = info["position_control"]
    assert pc["llm_coef_raw_ci"][0] > 0 and w == pc["weight"] > 0 and info["shipped"]["reason"].startswith("ci_excludes_zero")


@pytest.mark.parametrize("seed", [0, 1])
def test_shown_in_prior_order_the_plain_fit_credits_the_echo_and_the_control_takes_it_out(seed: int) -> None:
    """Without the canonical step (rotations of the prior order, P=2) the first label shown is the prior's best
    in one order of two: the plain fit rewards the echo; the position-controlled fit, which ships, does not."""
    prior, lp, y, groups, control, _ = _scored(informative=False, p=2, canonical=False, seed=seed, n_imp=200)
    w, info = fit_llm_term(prior, lp, y, groups=groups, position=control, n_boot=20, seed=seed)
    assert info["weight"] > 0  # the plain fit credits the first-label preference (shown first = the prior's best)
    assert w == 0.0 and info["shipped"]["fit"] == "position_control" and info["shipped"]["weight"] == 0.0


@pytest.mark.llm_server
def test_tune_fits_llm_score_coef_against_the_real_server(local_llm_url: str, eval_data_dir, tmp_path) -> None:
    """The CLI path: ADSELECT_LLM_URL names the server (unset, the bundled one is started for the fit); 4 demo
    impressions, P=2. A handful of impressions fits nothing: what is checked is the machinery and the record."""
    weights = tmp_path / "w.json"
    env = {"ADSELECT_LLM_URL": local_llm_url, "ADSELECT_SCORE_PERMUTATIONS": "2", "ADSELECT_LLM_MAX_CANDIDATES": "4"}
    res = CliRunner().invoke(
        app,
        [
            "eval", "tune", "--ads", str(DEMO / "ads.jsonl"), "--impressions", str(DEMO / "impressions.jsonl"),
            "--data-dir", str(eval_data_dir), "--out", str(weights), "--no-interactions",
            "--llm-mode", "score", "--llm-impressions", "4", "--no-injection-check",
        ],
        env=env,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model = FusionModel.load(weights)
    fit = model.meta["llm_score_fit"]
    scored = fit["scored"]
    assert fit["impressions"] == scored["scored"] == 4 and scored["failed"] == 0
    assert scored["permutations"] == 2 and scored["calls"] == 8
    n = scored["n_candidates"]
    assert scored["partially_answered"] or scored["answered_calls"] == 8
    assert fit["rows"] == n * scored["answered_calls"] and fit["served_by"] == local_llm_url  # one row per candidate and answered order
    assert set(scored["position_profile"]) == {f"{n}:{p}" for p in range(n)}
    shipped, pc = fit["shipped"], fit["position_control"]
    assert shipped["fit"] == "position_control" and "llm_coef_raw_ci" in pc and "sent_position_coef" in pc
    assert model.llm_score_coef == 0.0  # --no-injection-check: whatever the fit, nothing positive may ship
    assert "--llm-mode score --llm-impressions 4" in model.meta["command"]
    assert f"llm_score_coef: {shipped['weight']}" in res.output
