"""`adselect eval` conventions: `eval run` is the run, the old form still runs with a warning, exit
status 1 for runtime errors and 2 for usage errors with the message on stderr, help on every option."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from adselect.cli import app
from eval.cli import DEPRECATED_FORM
from tests.eval.conftest import MIND


def _args(out: Path, data_dir: Path) -> list[str]:
    return [
        "--ads", str(MIND / "ads.jsonl"), "--impressions", str(MIND / "impressions_dev.jsonl"), "--limit", "10",
        "--no-llm", "--no-progress", "--data-dir", str(data_dir), "--out", str(out),
    ]  # fmt: skip


def test_eval_run_and_the_deprecated_form_give_the_same_report(eval_data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    new = runner.invoke(app, ["eval", "run", *_args(tmp_path / "new", eval_data_dir)])
    assert new.exit_code == 0, new.output
    assert DEPRECATED_FORM not in new.stderr
    old = runner.invoke(app, ["eval", *_args(tmp_path / "old", eval_data_dir)])
    assert old.exit_code == 0, old.output
    assert DEPRECATED_FORM in old.stderr and DEPRECATED_FORM not in old.stdout
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("new", "old"))
    assert a["metrics"] == b["metrics"] and a["n_impressions"] == 10


def test_usage_errors_exit_2_and_runtime_errors_exit_1_on_stderr(eval_data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing_out = runner.invoke(app, ["eval", "run", "--config", "mind_chatgptnews"])
    assert missing_out.exit_code == 2 and "--out" in missing_out.stderr
    unknown = runner.invoke(app, ["eval", "run", "--config", "mind_chatgptnewz", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "mind_chatgptnews" in unknown.stderr and unknown.stdout == ""
    bad_system = runner.invoke(app, ["eval", "run", *_args(tmp_path / "y", eval_data_dir), "--systems", "bm26"])
    assert bad_system.exit_code == 2 and "bm25" in bad_system.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    runtime = runner.invoke(app, ["eval", "run", *_args(blocked, eval_data_dir)])  # the file system refuses --out
    assert runtime.exit_code == 1 and runtime.stderr.startswith("error: ") and runtime.stdout == ""


def test_every_eval_command_and_option_has_help() -> None:
    group = typer.main.get_command(app).commands["eval"]
    assert {"run", "validate", "tasks", "tune", "sample-logged", "import-mind"} <= set(group.commands)
    missing = [
        f"{name} {p.name}"
        for name, cmd in group.commands.items()
        for p in [*cmd.params, None]
        if (p is None and not cmd.help) or (p is not None and p.name != "help" and not getattr(p, "help", None))
    ]
    assert missing == []


def test_import_mind_command_writes_canonical_files(tmp_path: Path) -> None:
    news = tmp_path / "news.tsv"
    news.write_text("N1\tsports\tsoccer\tA match\tTwo teams played.\turl\t[]\t[]\nN2\tnews\tworld\tA summit\t\turl\t[]\t[]\n")
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-0 N2-1\n2\tU2\t11/11/2019 9:06:58 AM\tN2\tN1-1 N2-0\n")
    res = CliRunner().invoke(app, ["eval", "import-mind", "--behaviors", str(behaviors), "--news", str(news), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"ads": 2, "impressions": 2, "out": str(tmp_path / "out")}
    imps = [json.loads(x) for x in (tmp_path / "out" / "impressions.jsonl").read_text().splitlines()]
    assert imps[0]["clicked"] == ["N2"] and imps[0]["candidates"] == ["N1", "N2"]
    bad = CliRunner().invoke(app, ["eval", "import-mind", "--behaviors", str(tmp_path / "none.tsv"), "--news", str(news), "--out", str(tmp_path / "o2")])
    assert bad.exit_code in (1, 2) and bad.stderr.startswith("error: ")
