"""Eval honesty does not depend on the data files: the display order of logged candidates decides nothing.

Every impression's candidate list is permuted (reversed, and shuffled) and written to a new file; every
metric, interval, paired difference and calibration number of every system is unchanged. MIND's
candidates tie often on popularity (news nobody in the histories read), so `popularity` and `covisit`
lean on the tie-break there; `random` shuffles, which must not start from the file's order.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.eval.conftest import MIND, run_task

KEYS = ("metrics", "ci", "n", "paired_vs_default", "calibration", "candidate_stage")


def _permuted(src: Path, dst: Path, how: str) -> Path:
    rng = random.Random(7)
    with src.open() as fh, dst.open("w") as out:
        for line in fh:
            rec = json.loads(line)
            c = list(rec["candidates"])
            rec["candidates"] = c[::-1] if how == "reversed" else rng.sample(c, len(c))
            out.write(json.dumps(rec) + "\n")
    return dst


@pytest.mark.parametrize("how", ["reversed", "shuffled"])
def test_permuting_every_candidate_list_leaves_every_metric_unchanged(mind_report, eval_settings, tmp_path: Path, how: str) -> None:
    from eval.env import prepare_env
    from eval.data import load_impressions

    base = mind_report[0]
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(_permuted(MIND / "impressions_dev.jsonl", tmp_path / "p.jsonl", how))}, "no_llm": True}
    permuted = run_task(doc, settings=eval_settings, out=tmp_path / "out")
    for key in KEYS:
        assert permuted[key] == base[key], key
    # The check has teeth: some impressions have candidates whose popularity ties with the clicked one.
    env = prepare_env(eval_settings, ads_path=MIND / "ads.jsonl", train_paths=[MIND / "impressions_dev.jsonl"], show_progress=False)
    pop, row = env.services.selector.generator.behaviour.popularity, env.services.index.row
    items = load_impressions(MIND / "impressions_dev.jsonl", catalog=row).items
    tied = [i for i in items if any(pop[row[c]] == pop[row[k]] for k in i.clicked for c in i.candidates if c != k)]
    assert len(tied) >= 10


def test_llm_systems_see_the_same_list_whatever_the_file_order(eval_settings, fake_llm, tmp_path: Path) -> None:
    """The fake LLM ranks the reverse of what it is sent: it would follow the file order if it leaked."""
    import uuid

    fake_llm.model = f"fake-ranking-{uuid.uuid4().hex[:8]}"
    llm = {"sample": 6, "max_candidates": 5, "model": fake_llm.model, "position_bias": False}
    systems = ["random", "popularity", "default", "llm", "default+llm"]
    a = run_task({"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")}, "systems": systems, "llm": llm},
                 settings=eval_settings, out=tmp_path / "a", llm_inner=fake_llm)  # fmt: skip
    p = _permuted(MIND / "impressions_dev.jsonl", tmp_path / "p.jsonl", "reversed")
    b = run_task({"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(p)}, "systems": systems, "llm": llm},
                 settings=eval_settings, out=tmp_path / "b", llm_inner=fake_llm)  # fmt: skip
    assert a["llm"]["summary"]["llm_used"] == 6
    for key in KEYS:
        assert b[key] == a[key], key
    assert b["llm"]["sample_metrics"] == a["llm"]["sample_metrics"]
    assert b["llm"]["cache"]["hits"] == 6  # the same rendered prompts: the candidate list was sent in the same order
