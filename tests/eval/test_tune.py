"""`adselect eval tune`: weights fitted without the evaluated users, and the report says so."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from typer.testing import CliRunner

from adselect.cli import app
from selection.fusion import FusionModel
from tests.eval.conftest import MIND, run_task


def test_tune_excludes_evaluated_users_and_eval_reports_it(eval_settings, eval_data_dir: Path, tmp_path: Path) -> None:
    lines = (MIND / "impressions_dev.jsonl").read_text().splitlines(keepends=True)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(lines[:10]))  # the impressions a report will evaluate
    weights = tmp_path / "weights.json"
    res = CliRunner().invoke(
        app,
        [
            "eval", "tune", "--ads", str(MIND / "ads.jsonl"), "--impressions", str(MIND / "impressions_dev.jsonl"),
            "--exclude", str(held), "--data-dir", str(eval_data_dir), "--out", str(weights), "--no-interactions",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model = FusionModel.load(weights)
    meta = model.meta
    held_users = {json.loads(x)["user_id"] for x in lines[:10]}
    assert meta["excluded_users"] == len(held_users)
    assert meta["train_impressions"] == 54 - sum(1 for x in lines if json.loads(x)["user_id"] in held_users)
    assert meta["exclude"][0]["sha256"] and meta["exclude"][0]["limit"] is None and meta["train_file"]["sha256"]
    assert meta["train_lines_read"] == 54
    assert meta["command"].startswith("adselect eval tune --ads ") and "--exclude" in meta["command"]
    assert model.llm_coef == 0.0 and meta["llm_fit"] is None
    # the calibration is fitted on a keyed-hash share of the tuning users the fusion never saw
    split = meta["calibration_split"]
    assert split["fusion_impressions"] + split["calibration_impressions"] == meta["train_impressions"]
    assert split["calibration_impressions"] > 0 and split["fusion_impressions"] > split["calibration_impressions"]
    assert meta["calibration_fit"]["negative_rate"] == 1.0  # MIND rows are logged candidates: nothing sampled
    assert "--calibration-share" in meta["command"] and model.calibration["method"] == meta["calibration_fit"]["method"]

    base = {"data": {"ads": str(MIND / "ads.jsonl")}, "no_llm": True, "fusion": {"weights": str(weights)}}
    on_held = run_task({**base, "data": {**base["data"], "impressions": str(held)}}, settings=eval_settings, out=tmp_path / "a")
    assert on_held["fusion"]["separation"]["status"] == "disjoint"
    assert on_held["provenance"]["fusion_weights"]["path"] == str(weights)
    on_all = run_task(
        {**base, "data": {**base["data"], "impressions": str(MIND / "impressions_dev.jsonl")}}, settings=eval_settings, out=tmp_path / "b"
    )
    sep = on_all["fusion"]["separation"]
    assert sep["status"] == "overlap" and sep["overlap_users"] == 54 - 10
    assert "overlap" in (tmp_path / "b" / "report.md").read_text()


def test_exclude_task_keeps_that_tasks_users_out(eval_settings, eval_data_dir: Path, tmp_path: Path) -> None:
    task = tmp_path / "mind_head.yaml"
    task.write_text(
        f"name: mind_head\ndata:\n  ads: {MIND / 'ads.jsonl'}\n  impressions: {MIND / 'impressions_dev.jsonl'}\n  limit: 10\nno_llm: true\n"
    )
    weights = tmp_path / "w.json"
    res = CliRunner().invoke(
        app,
        [
            "eval", "tune", "--ads", str(MIND / "ads.jsonl"), "--impressions", str(MIND / "impressions_dev.jsonl"),
            "--exclude-task", str(task), "--data-dir", str(eval_data_dir), "--out", str(weights), "--no-interactions",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = FusionModel.load(weights).meta
    assert meta["exclude"][0]["limit"] == 10 and meta["exclude"][0]["task"] == "mind_head"
    assert "--exclude-task" in meta["command"]
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl"), "limit": 10},
        "no_llm": True,
        "fusion": {"weights": str(weights)},
    }
    report = run_task(doc, settings=eval_settings, out=tmp_path / "out")
    assert report["fusion"]["separation"]["status"] == "disjoint"


def test_llm_weight_is_fitted_from_an_eval_runs_llm_results(eval_settings, eval_data_dir: Path, fake_llm, tmp_path: Path) -> None:
    run_dir = tmp_path / "llm-run"
    doc = {
        "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")},
        "systems": ["default", "llm"],
        "llm": {"sample": 20, "position_bias": False, "max_candidates": 6, "model": "fake-ranking"},
    }
    run_task(doc, settings=eval_settings, out=run_dir, llm_inner=fake_llm)
    weights = tmp_path / "w.json"
    res = CliRunner().invoke(
        app,
        [
            "eval", "tune", "--ads", str(MIND / "ads.jsonl"), "--impressions", str(MIND / "impressions_dev.jsonl"),
            "--llm-run", str(run_dir), "--data-dir", str(eval_data_dir), "--out", str(weights), "--no-interactions",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    model = FusionModel.load(weights)
    fit = model.meta["llm_fit"]
    assert fit["impressions"] == 20 and fit["rows"] == 20 * 6
    assert "--llm-run" in model.meta["command"]
    # The shipped weight is the position-controlled fit's, and 0 unless its interval excludes 0.
    shipped, pc = fit["shipped"], fit["position_control"]
    assert shipped["fit"] == "position_control" and shipped["weight"] == model.llm_coef
    assert shipped["llm_coef_raw_ci"] == pc["llm_coef_raw_ci"]
    # The fake only reverses the list it is shown: its ranking is the shown position, nothing more.
    assert pc["llm_top_was_shown_first"] == 0.0
    assert pc["llm_coef_raw_ci"][0] <= 0.0 and model.llm_coef == 0.0
    assert shipped["reason"].startswith("ci_includes_zero")


def _llm_logs(*, informative: bool, n_imp: int = 300, n_sent: int = 6, seed: int = 0):
    """Synthetic LLM runs: n_sent candidates in prior order, one clicked; the LLM either puts the click first
    30% of the time (random order otherwise) or echoes the order it was shown."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prior, ranks, y, groups, sent = [], [], [], [], []
    for g in range(n_imp):
        s = np.sort(rng.normal(0, 1, n_sent))[::-1]
        clicked = int(rng.choice(n_sent, p=np.exp(s) / np.exp(s).sum()))
        if not informative:
            order = list(range(n_sent))  # echo the presented order
        elif rng.random() < 0.3:
            order = [clicked] + [k for k in rng.permutation(n_sent).tolist() if k != clicked]
        else:
            order = rng.permutation(n_sent).tolist()
        rank = {k: r for r, k in enumerate(order)}
        prior += s.tolist()
        ranks += [rank[k] for k in range(n_sent)]
        y += [1.0 if k == clicked else 0.0 for k in range(n_sent)]
        groups += [g] * n_sent
        sent += list(range(n_sent))
    return np.array(prior), ranks, np.array(y), np.array(groups), sent


def test_llm_weight_fit_reports_a_bootstrap_interval_and_a_position_control() -> None:
    from eval.tune import fit_llm_weight

    prior, ranks, y, groups, sent = _llm_logs(informative=True)
    w, info = fit_llm_weight(prior, ranks, y, groups=groups, sent_ranks=sent, n_boot=100)
    assert w > 0 and info["weight_ci"][0] > 0 and info["share_positive"] == 1.0
    assert info["llm_coef_raw_ci"][0] < info["llm_coef_raw"] < info["llm_coef_raw_ci"][1]
    assert info["bootstrap"]["n"] == 100 and info["rows"] == len(y)
    pc = info["position_control"]
    assert pc["llm_coef_raw"] > 1.0 and pc["llm_coef_raw_ci"][0] > 0  # the click-finding survives the control
    # an LLM that only echoes the order it is shown: whatever it earns, the position explains as well
    prior, ranks, y, groups, sent = _llm_logs(informative=False)
    w, info = fit_llm_weight(prior, ranks, y, groups=groups, sent_ranks=sent, n_boot=50)
    pc = info["position_control"]
    assert pc["llm_top_was_shown_first"] == 1.0
    assert abs(pc["llm_coef_raw"] - pc["sent_position_coef"]) < 1e-6  # identical columns: no way to tell them apart
    _, plain = fit_llm_weight(prior, ranks, y)
    assert "weight_ci" not in plain and "position_control" not in plain


class FakeInjectionCheck:
    """Stands in for the injection test (tests/security/test_injection.py in a subprocess): records the
    candidate weights file it was asked to check and answers `passed`."""

    def __init__(self, passed: bool):
        self.passed, self.seen = passed, []

    def __call__(self, path: Path):
        from eval.injection_gate import InjectionCheck

        self.seen.append(FusionModel.load(path).llm_coef)
        return InjectionCheck(self.passed, "fake", str(path), None, 0 if self.passed else 1, "")


_FIT: list = []  # one fit shared by the gate cases (refits are the slow part)


def _fitted(tmp_path: Path, *, check: bool = True):
    from eval.tune import fit_llm_weight
    from eval.tune_run import TuneOptions
    from selection.fusion import SHIPPED_WEIGHTS

    if not _FIT:
        prior, ranks, y, groups, sent = _llm_logs(informative=True)
        _FIT.append(fit_llm_weight(prior, ranks, y, groups=groups, sent_ranks=sent, n_boot=30))
    w, info = _FIT[0]
    model = FusionModel.load(SHIPPED_WEIGHTS)
    model.meta["llm_fit"] = copy.deepcopy(info)
    opts = TuneOptions(ads=tmp_path / "a", impressions=tmp_path / "i", out=tmp_path / "w.json", injection_check=check)
    return w, model, opts


def test_a_positive_llm_weight_ships_only_after_the_injection_check_passes(tmp_path: Path) -> None:
    from eval.tune_run import gate_positive_weight

    w, model, opts = _fitted(tmp_path)
    assert w > 0 and model.meta["llm_fit"]["shipped"]["fit"] == "position_control"
    assert w == model.meta["llm_fit"]["position_control"]["weight"] != model.meta["llm_fit"]["weight"]  # not the plain fit's
    failing = FakeInjectionCheck(passed=False)
    assert gate_positive_weight(model, w, opts=opts, check=failing) == 0.0
    assert failing.seen == [w]  # checked at exactly the weight that would ship
    fit = model.meta["llm_fit"]
    assert fit["shipped"]["weight"] == 0.0 and fit["shipped"]["reason"].startswith("injection_check_failed")
    assert fit["injection_check"]["passed"] is False and not list(tmp_path.glob("*.candidate.json"))

    w, model, opts = _fitted(tmp_path)
    assert gate_positive_weight(model, w, opts=opts, check=FakeInjectionCheck(passed=True)) == w
    assert model.meta["llm_fit"]["injection_check"]["passed"] is True and model.meta["llm_fit"]["shipped"]["weight"] == w

    w, model, opts = _fitted(tmp_path, check=False)
    never = FakeInjectionCheck(passed=True)
    assert gate_positive_weight(model, w, opts=opts, check=never) == 0.0 and never.seen == []
    assert model.meta["llm_fit"]["shipped"]["reason"].startswith("injection_check_not_run")


def test_the_plain_fits_weight_never_ships_when_the_position_explains_it() -> None:
    """An LLM that echoes the shown order earns a plain-fit weight; the shipped (controlled) weight is 0."""
    from eval.tune import fit_llm_weight

    prior, ranks, y, groups, sent = _llm_logs(informative=False)
    w, info = fit_llm_weight(prior, ranks, y, groups=groups, sent_ranks=sent, n_boot=50)
    assert info["weight"] > 0  # the confounded fit would give the LLM a say
    assert w == 0.0 and info["shipped"]["weight"] == 0.0 and info["shipped"]["fit"] == "position_control"
    w, info = fit_llm_weight(prior, ranks, y)  # no shown positions: nothing can ship
    assert w == 0.0 and info["shipped"]["reason"].startswith("no_position_control")


def test_calibration_users_are_kept_apart_and_the_sampling_rate_is_counted() -> None:
    import numpy as np

    from eval.tune import TrainingSet
    from eval.tune_run import split_for_calibration

    n_imp, per = 200, 20
    group = np.repeat(np.arange(n_imp), per)
    y = np.tile([1.0] + [0.0] * (per - 1), n_imp)
    ts = TrainingSet(
        np.random.default_rng(0).normal(size=(n_imp * per, 3)), y, group, n_imp, 0,
        [f"user-{i // 2}" for i in range(n_imp)], np.full(n_imp, 19.0), np.full(n_imp, 1900.0),
    )  # fmt: skip
    assert ts.negative_rate() == 0.01
    fusion, cal, record = split_for_calibration(ts, share=0.2)
    assert not set(fusion.users) & set(cal.users) and set(fusion.users) | set(cal.users) == set(ts.users)
    assert fusion.n_impressions + cal.n_impressions == n_imp and record["calibration_impressions"] == cal.n_impressions
    assert len(cal.y) == cal.n_impressions * per and sorted(set(cal.group.tolist())) == list(range(cal.n_impressions))
    assert cal.negative_rate() == 0.01
    assert split_for_calibration(ts, share=0.2)[2] == record  # deterministic


def test_training_rows_fed_in_chunks_are_the_one_at_a_time_rows(eval_settings) -> None:
    """build_training_set with `featurize_many` over chunks (what eval tune --ray feeds its actors): the
    same rows, skips and lines read as the one-at-a-time loop, stopping at max_impressions."""
    from eval.env import prepare_env
    from eval.tune import build_training_set, featurize
    from retrieval.records import iter_impressions

    env = prepare_env(eval_settings, ads_path=MIND / "ads.jsonl", train_paths=[MIND / "impressions_dev.jsonl"], show_progress=False)
    gen, decay = env.services.selector.generator, env.services.selector.recency_decay
    users = sorted({rec.user_id for _, rec in iter_impressions(MIND / "impressions_dev.jsonl")})

    def build(**kw):
        recs = (rec.model_copy(update={"candidates": [] if i % 2 else rec.candidates}) for i, (_, rec) in enumerate(iter_impressions(MIND / "impressions_dev.jsonl")))
        return build_training_set(
            recs, generator=gen, recency_decay=decay, n_random=5, n_hard=2, exclude_users=set(users[:4]), max_impressions=25, seed=1, **kw
        )

    one = build()
    calls: list[int] = []

    def many(planned):
        calls.append(len(planned))
        return [featurize(p, generator=gen, recency_decay=decay, n_hard=2) for p in planned]

    chunked = build(featurize_many=many, chunk=7)
    assert max(calls) == 7 and one.n_impressions == chunked.n_impressions == 25
    assert (one.X == chunked.X).all() and (one.y == chunked.y).all() and (one.group == chunked.group).all()
    assert one.skipped == chunked.skipped and one.lines_read == chunked.lines_read < 54
    assert one.users == chunked.users and (one.negatives_pool == chunked.negatives_pool).all()


def test_hard_negatives_come_only_from_unions_that_retrieved_the_click() -> None:
    """A click the union missed scores below the union's rows on every prior (that is why it was missed):
    pairing it with them taught the fusion that a high prior means no click (--n-hard 20: dense weight
    -2.29, sampled nDCG@10 0.71). The retrieved list is the union's click + uniform other union rows, with
    the features generation computed; no list when the click was not retrieved."""
    import numpy as np

    from eval.tune import retrieved_list
    from retrieval.candidates import CandidateSet

    rows = np.array([10, 11, 12, 13, 14, 15])
    cs = CandidateSet(rows, np.arange(12, dtype=np.float32).reshape(6, 2))
    assert retrieved_list(cs, pos_rows=[99], n=3, line=1) is None  # missed: no list
    got_rows, feats, y = retrieved_list(cs, pos_rows=[13], n=3, line=1)
    assert got_rows[0] == 13 and y.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert len(set(got_rows.tolist())) == 4 and set(got_rows.tolist()) <= set(rows.tolist())
    assert (feats == cs.features[np.searchsorted(rows, got_rows)]).all()
    assert (retrieved_list(cs, pos_rows=[13], n=3, line=1)[0] == got_rows).all()  # seeded by the line
    assert len(retrieved_list(cs, pos_rows=[13], n=50, line=1)[0]) == 6  # fewer rows than asked: all of them
