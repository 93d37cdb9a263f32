"""Bad data never crashes a run: unusable impressions are skipped by rule, malformed lines name file and line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel.errors import DataFileError
from eval.data import SKIP_RULES, load_impressions
from tests.eval.conftest import MIND, run_task

CATALOG = {"N1": 0, "N2": 1, "N3": 2, "N4": 3}


def _imp(iid: str, *, history=("N1",), candidates=("N2", "N3"), clicked=("N2",), user="U1") -> dict:
    return {"impression_id": iid, "user_id": user, "history": list(history), "candidates": list(candidates), "clicked": list(clicked)}


BAD_AND_GOOD = [
    _imp("ok-1"),
    _imp("ok-1"),  # duplicate_impression_id
    _imp("no-click", clicked=()),
    _imp("clicked-unknown", clicked=("N99",), candidates=("N2", "N99")),
    _imp("empty-history", history=()),
    _imp("unknown-history", history=("N98", "N97")),  # empty_history after dropping unknown ids
    _imp("no-cands", candidates=("N90", "N91"), clicked=("N2",)),
    _imp("clicked-not-shown", candidates=("N3", "N4"), clicked=("N2",)),
    _imp("ok-2", history=("N1", "N77"), candidates=("N2", "N55", "N3", "N3"), clicked=("N3", "N66")),
    _imp("ok-full", candidates=(), clicked=("N4",)),
]


def _write(path: Path, rows: list[dict], extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(x + "\n" for x in extra_lines))
    return path


def test_each_rule_counts_and_good_rows_are_cleaned(tmp_path: Path) -> None:
    loaded = load_impressions(_write(tmp_path / "i.jsonl", BAD_AND_GOOD), catalog=CATALOG)
    assert [i.impression_id for i in loaded.items] == ["ok-1", "ok-2", "ok-full"]
    assert loaded.skipped == {
        "duplicate_impression_id": 1,
        "no_click": 1,
        "clicked_not_in_catalog": 1,
        "empty_history": 2,
        "no_candidates_in_catalog": 1,
        "clicked_not_in_candidates": 1,
    }
    assert set(loaded.skipped) == set(SKIP_RULES)
    ok2 = loaded.items[1]
    assert ok2.history == ["N1"] and ok2.candidates == ["N2", "N3"] and ok2.clicked == {"N3"}
    assert loaded.items[2].candidates is None and loaded.items[2].protocol == "full"
    assert loaded.warnings["unknown_history_ids"] == 1 and loaded.warnings["repeated_candidate_ids"] == 1
    assert loaded.n_read == len(BAD_AND_GOOD)


def test_limit_counts_lines_read(tmp_path: Path) -> None:
    loaded = load_impressions(_write(tmp_path / "i.jsonl", BAD_AND_GOOD), catalog=CATALOG, limit=3)
    assert loaded.n_read == 3 and [i.impression_id for i in loaded.items] == ["ok-1"]


@pytest.mark.parametrize(
    "line, reason",
    [("{not json", "malformed JSON"), ("[1, 2]", "JSON object"), ('{"impression_id": "x", "user_id": "u", "history": "N1"}', "history")],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write(tmp_path / "i.jsonl", BAD_AND_GOOD[:2], [line])
    with pytest.raises(DataFileError, match=reason) as e:
        load_impressions(path, catalog=CATALOG)
    assert e.value.path == str(path) and e.value.line == 3


def test_a_run_over_bad_data_finishes_and_reports_the_skips(eval_settings, tmp_path: Path) -> None:
    """Real MIND ids mixed with every kind of bad row; every system still reports."""
    real = [json.loads(x) for x in (MIND / "impressions_dev.jsonl").read_text().splitlines()[:6]]
    bad = [
        {**real[0], "impression_id": real[1]["impression_id"]},  # duplicate id (second occurrence)
        {**real[2], "clicked": []},
        {**real[3], "history": ["N-unknown"]},
        {**real[4], "candidates": ["N-x", "N-y"]},
        {**real[5], "clicked": ["N-unknown"]},
    ]
    path = _write(tmp_path / "impressions.jsonl", [real[1], *bad, real[0]])
    doc = {"data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(path)}, "no_llm": True}
    report = run_task(doc, settings=eval_settings, out=tmp_path / "out")
    assert report["n_impressions"] == 2 and report["n_read"] == 7
    assert report["skipped"]["duplicate_impression_id"] == 1
    assert report["skipped"]["no_click"] == 1
    assert report["skipped"]["empty_history"] == 1
    assert report["skipped"]["no_candidates_in_catalog"] == 1
    assert report["skipped"]["clicked_not_in_catalog"] == 1
    assert report["metrics"]["default"]["auc"] is not None
