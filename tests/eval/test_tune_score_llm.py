"""Scoring mode's LLM weight (`llm_score_coef`): the listwise fit machinery (eval.tune.fit_llm_term) over the
averaged label log-probability with the position-only LLM term as the control (eval.tune_score); then
`adselect eval tune --llm-mode score` against the real bundled llama.cpp server on a few demo impressions."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from adselect.cli import app
from eval.tune import fit_llm_term
from eval.tune_score import position_control
from kernel.settings import REPO_ROOT
from selection.fusion import FusionModel

DEMO = REPO_ROOT / "data" / "demo"


def _scored(*, informative: bool, n_imp: int = 300, n: int = 6, seed: int = 0):
    """Synthetic scoring-mode logs with P=2 (the prior order and its reverse): the model prefers the first
    label it is shown (+2 logits, noise 0.5) and, when informative, the clicked candidate too (+2)."""
    rng = np.random.default_rng(seed)
    prior, lp, y, groups, by_order = [], [], [], [], []
    for g in range(n_imp):
        s = np.sort(rng.normal(0, 1, n))[::-1]
        clicked = int(rng.choice(n, p=np.exp(s) / np.exp(s).sum()))
        shown: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        for order in (list(range(n)), list(range(n))[::-1]):
            logits = np.array([2.0 * (p == 0) + 2.0 * (informative and i == clicked) for p, i in enumerate(order)])
            logits += rng.normal(0, 0.5, n)
            norm = logits - np.log(np.exp(logits).sum())
            for p, i in enumerate(order):
                shown[i].append((p, float(norm[p])))
        prior += s.tolist()
        lp += [float(np.mean([v for _, v in shown[i]])) for i in range(n)]
        y += [float(i == clicked) for i in range(n)]
        groups += [g] * n
        by_order += shown
    control, profile = position_control(by_order, [n] * len(by_order))
    return np.array(prior), np.array(lp), np.array(y), np.array(groups), control, profile


def test_position_control_is_the_position_only_term_and_varies_where_the_mean_position_does_not() -> None:
    # one impression of 3 candidates shown in order and reversed; a second of 2 candidates
    by_order = [[(0, -0.1), (2, -3.0)], [(1, -2.0), (1, -2.0)], [(2, -3.0), (0, -0.1)], [(0, -0.5), (1, -1.0)], [(1, -1.0), (0, -0.5)]]
    control, profile = position_control(by_order, [3, 3, 3, 2, 2])
    assert profile == {"2:0": -0.5, "2:1": -1.0, "3:0": -0.1, "3:1": -2.0, "3:2": -3.0}
    # every mean position is 1.0 (resp. 0.5), but the ends (the favoured first label) get the larger control
    assert control.tolist() == pytest.approx([-1.55, -2.0, -1.55, -0.75, -0.75])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_first_label_echo_earns_a_plain_weight_and_ships_zero_an_informative_scorer_ships(seed: int) -> None:
    prior, lp, y, groups, control, _ = _scored(informative=False, seed=seed)
    w, info = fit_llm_term(prior, lp, y, groups=groups, position=control, n_boot=50, seed=seed)
    assert info["weight"] > 0  # the plain fit credits the first-label preference (shown first = the prior's best)
    assert w == 0.0 and info["shipped"]["fit"] == "position_control" and info["shipped"]["weight"] == 0.0
    prior, lp, y, groups, control, _ = _scored(informative=True, seed=seed)
    w, info = fit_llm_term(prior, lp, y, groups=groups, position=control, n_boot=50, seed=seed)
    pc = info["position_control"]
    assert pc["llm_coef_raw_ci"][0] > 0 and w == pc["weight"] > 0 and info["shipped"]["reason"].startswith("ci_excludes_zero")


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
    assert fit["rows"] == 4 * n and fit["served_by"] == local_llm_url
    assert set(scored["position_profile"]) == {f"{n}:{p}" for p in range(n)}
    shipped, pc = fit["shipped"], fit["position_control"]
    assert shipped["fit"] == "position_control" and "llm_coef_raw_ci" in pc and "sent_position_coef" in pc
    assert model.llm_score_coef == 0.0  # --no-injection-check: whatever the fit, nothing positive may ship
    assert "--llm-mode score --llm-impressions 4" in model.meta["command"]
    assert f"llm_score_coef: {shipped['weight']}" in res.output
