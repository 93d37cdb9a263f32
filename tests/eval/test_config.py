from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adselect.cli import app
from kernel.errors import UnknownName
from eval.config import TASKS_DIR, TaskError, load_task, task_from_document, validate_task
from eval.systems import resolve_systems


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_include_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    _write(
        tmp_path / "base.yaml",
        "name: base\ndata:\n  ads: a.jsonl\n  impressions: i.jsonl\n  limit: 10\nsystems: [random, default]\n"
        "llm:\n  model: m1\n  temperature: 0.0\n",
    )
    variant = _write(
        tmp_path / "variant.yaml",
        "include: base.yaml\nname: variant\ndata:\n  limit: 5\nsystems: [bm25]\nllm:\n  sample: 7\n",
    )
    task = load_task(variant)
    assert task.name == "variant"
    assert task.data.ads == Path("a.jsonl") and task.data.limit == 5  # merged, not replaced
    assert task.systems == ["bm25"]  # lists replace
    assert (task.llm.model, task.llm.sample, task.llm.temperature) == ("m1", 7, 0.0)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.yaml", "data:\n  ads: a.jsonl\n  impressions: i.jsonl\nllm:\n  sample: 3\n")
    task = load_task(f, overrides={"llm": {"sample": 9}, "no_llm": True})
    assert task.llm.sample == 9 and task.no_llm and task.data.ads == Path("a.jsonl")


def test_include_cycle_and_missing_include_are_errors(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(TaskError, match="cycle"):
        load_task(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "include: nowhere.yaml\n")
    with pytest.raises(TaskError, match="not found"):
        load_task(tmp_path / "c.yaml")


def test_unknown_keys_and_bad_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"llm\.temprature"):
        task_from_document({"llm": {"temprature": 0.1}})
    with pytest.raises(TaskError, match=r"data\.limit"):
        task_from_document({"data": {"limit": 0}})
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(_write(tmp_path / "bad.yaml", "data: [unclosed\n"))


def test_validate_reports_every_problem_without_running(tmp_path: Path) -> None:
    task = task_from_document(
        {
            "data": {"ads": str(tmp_path / "missing.jsonl"), "impressions": str(tmp_path / "none.jsonl")},
            "systems": ["defualt", "bm25", "llm"],
            "fusion": {"weights": str(tmp_path / "w.json")},
            "llm": {"prompt": "rerank_nope"},
        }
    )
    problems = "\n".join(validate_task(task))
    assert "data.ads: file not found" in problems
    assert "data.impressions: file not found" in problems
    assert "Did you mean default" in problems
    assert "fusion.weights: file not found" in problems
    assert "llm.prompt" in problems


def test_unknown_system_suggests_close_names() -> None:
    with pytest.raises(UnknownName, match="Did you mean default"):
        resolve_systems(["random", "defualt"])
    assert resolve_systems(["bm25", "bm25", "default+llm"]) == ["bm25", "default+llm"]


@pytest.mark.parametrize("path", sorted(TASKS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_tasks_validate(path: Path) -> None:
    assert validate_task(load_task(path)) == []


def test_shipped_variant_only_overrides_what_changes() -> None:
    base, variant = load_task("games_sampled"), load_task("games_sampled_llm")
    assert variant.llm.sample != base.llm.sample
    assert variant.data == base.data and variant.systems == base.systems


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", "validate", "games_sampled", "mind_chatgptnews"])
    assert ok.exit_code == 0, ok.output
    assert "games_sampled: ok" in ok.output
    bad = _write(tmp_path / "bad.yaml", "include: games_sampled.yaml\n")
    bad.write_text(f"include: {TASKS_DIR / 'games_sampled.yaml'}\nsystems: [random, bm26]\n")
    res = runner.invoke(app, ["eval", "validate", str(bad)])
    assert res.exit_code == 1
    assert "bm26" in res.output and "Did you mean bm25" in res.output


def test_rewrite_variant_only_turns_rewrite_on() -> None:
    base, variant = load_task("mind_chatgptnews"), load_task("mind_chatgptnews_rewrite")
    assert variant.llm.rewrite and not base.llm.rewrite
    assert variant.data == base.data and variant.systems == base.systems
    assert variant.llm.model_copy(update={"rewrite": False}) == base.llm


def test_cli_options_set_rewrite_and_position_bias() -> None:
    from eval.cli import _overrides

    assert _overrides(rewrite=True, position_bias=False) == {"llm": {"rewrite": True, "position_bias": False}}
    assert _overrides(rewrite=None, position_bias=None) == {}
