"""The small seeded traffic simulation: OPE from the real log + feedback recovers each target's on-policy CTR."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from eval.ope import estimate, logged_data_from_records, logged_pctr

from eval.ope_sim import (
    BehaviourTables,
    DirectModel,
    SimConfig,
    StandInService,
    load_users,
    read_rows,
    run_simulation,
    stand_in_variants,
)
from selection.impression_log import LogReadStats, iter_log_records

DEV = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "amazon_games_6k" / "impressions_sampled_dev.jsonl"
if not DEV.exists():  # the worktree layout (/work/wt/NAME) vs a clone beside shared/
    DEV = Path("/work/shared/data/amazon_games_6k/impressions_sampled_dev.jsonl")


SEEDS = (0, 1, 2)  # every seed tried, the unlucky ones included (not a seed picked because it passes)
ALPHA = 0.001  # 99.9% intervals: 18 of them (3 seeds x 3 targets x SNIPS/DR) all hold ~98% of the time if right


@pytest.mark.parametrize("seed", SEEDS)
def test_snips_and_dr_cis_contain_each_targets_on_policy_ctr(tmp_path: Path, seed: int) -> None:
    """SNIPS and DR 99.9% bootstrap percentile intervals (the same bootstrap as the 95% ones, alpha = 0.001,
    4,000 resamples so the tails hold 2 draws each) contain each target's on-policy CTR, for every seed of
    SEEDS. At 95%, 6 intervals per seed miss together by chance about a quarter of the time (seeds 0 and 2 of
    this setup do), so a 95% test passes only for a chosen seed; bench/bench_ope.py reports the 95% coverage
    over seeds. The test still has power: the same data with the logged propensities dropped (importance
    weights of 1, as if nothing had been randomised) misses the truth."""
    rows = read_rows(DEV)
    tables = BehaviourTables.from_rows(rows)
    direct = DirectModel.fit(load_users(rows, n=500, seed=seed), tables)  # disjoint from the simulated users
    users = load_users(rows, n=800, seed=seed, offset=500)
    service = StandInService(variants=stand_in_variants(temperature=1.0), tables=tables, direct=direct, data_dir=tmp_path)
    config = SimConfig(k=1, seed=seed, n_bootstrap=4000, alpha=ALPHA)
    result = run_simulation(service, users, config)
    records = [r for r in service.records() if r.get("arm") == config.logging_arm]
    service.close()

    assert result.n_logged == len(users)
    stats = LogReadStats()
    assert sum(1 for _ in iter_log_records(tmp_path / "impressions", stats=stats)) == len(users) * (1 + len(config.targets))
    assert stats.torn == 0
    truths = {name: v["on_policy_ctr"] for name, v in result.variants.items()}
    assert len(set(truths.values())) == len(truths)  # the targets differ, so containing each one means something
    for name, v in result.variants.items():
        assert v["n"] == len(users) and 0 < v["ess"] < len(users)
        for est in ("snips", "dr"):
            lo, hi = v[est]["ci"]
            assert lo <= truths[name] <= hi, (name, est, v[est], truths[name])

    # power: without the propensities (weights 1) the estimator is wrong and the same intervals miss
    # (it then scores only the impressions where the explored ad happens to be the target's choice)
    missed = 0
    for name in truths:
        rankings = result.rankings[name]
        data, _ = logged_data_from_records(records, target=lambda rec: rankings[rec["request_id"]], k=1, direct=logged_pctr)
        wrong = estimate(dataclasses.replace(data, logging_propensity=np.ones_like(data.logging_propensity)), n_bootstrap=4000, alpha=ALPHA, seed=seed)
        missed += sum(not (e.ci[0] <= truths[name] <= e.ci[1]) for e in (wrong.snips, wrong.dr))
    assert missed >= 1
