"""`adselect` as a user runs it: real subprocesses of this checkout's CLI (`python -m adselect.cli`, what the
`adselect` entry point calls), in a clean environment. Conventions checked: help on every command and option,
exit 2 for usage and input errors, 1 for runtime failures, messages on stderr, JSON log lines on stderr,
and `select` printing exactly the JSON shape of POST /v1/select."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from adselect.cli import app
from server.protocol import AdOut, CopyOut, PromptOut, SelectResponseBody

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "data" / "demo"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `adselect ARGS` from `cwd` (no .env there) with no ADSELECT_* variables but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [clean.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "adselect.cli", *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def log_lines(stderr: str) -> list[dict]:
    """Every stderr line that is a log record (JSON object); progress bars and messages are not."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _commands(cmd, path: list[str]):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, [*path, name])


def test_every_command_and_option_has_help():
    """`adselect eval …` is eval/cli.py's and checked there; the rest is here."""
    missing = []
    for path, cmd in _commands(typer.main.get_command(app), ["adselect"]):
        if path[1:2] == ["eval"]:
            continue
        if not (cmd.help or "").strip():
            missing.append(" ".join(path))
        missing += [f"{' '.join(path)} {p.name}" for p in cmd.params if not (getattr(p, "help", None) or "").strip()]
    assert not missing


def test_usage_errors_exit_2_on_stderr(tmp_path: Path):
    for args in (["select", "--k", "0"], ["select", "--nope"], ["--log-format", "xml", "settings"]):
        res = run(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stdout == "" and res.stderr.strip()
    assert "k:" in run("select", "--k", "0", cwd=tmp_path).stderr  # the endpoint's limit, the endpoint's words
    res = run("settings", cwd=tmp_path, env={"ADSELECT_MAX_INFLIGHT": "many"})
    assert res.returncode == 2 and "ADSELECT_MAX_INFLIGHT" in res.stderr and "Traceback" not in res.stderr


def test_a_runtime_failure_exits_1_with_its_message_on_stderr(tmp_path: Path):
    res = run("select", "--data-dir", str(tmp_path / "never-ingested"), cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and "run `adselect ingest" in res.stderr and "Traceback" not in res.stderr


def test_prompts_list(tmp_path: Path):
    res = run("prompts", "list", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {line.split("\t", 1)[0]: line.split("\t") for line in res.stdout.splitlines()}
    _, version, sha, _ = rows["rerank"]
    assert version.startswith("v") and len(sha) == 12


def test_prompts_validate_passes_and_names_a_broken_file(tmp_path: Path):
    res = run("prompts", "validate", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "valid:" in res.stdout and "rerank" in res.stdout.split("valid:")[1].replace(",", " ").split()

    broken = tmp_path / "prompts"
    broken.mkdir()
    shutil.copy(REPO_ROOT / "prompts" / "rerank.yaml", broken / "rerank.yaml")
    (broken / "oops.yaml").write_text("name: oops\nversion: 1\nvariables: [a]\nsystem: hi\nuser: '{{ b }}'\n")
    res = run("prompts", "validate", cwd=tmp_path, env={"ADSELECT_PROMPTS_DIR": str(broken)})
    assert res.returncode == 2
    assert "oops.yaml" in res.stderr and "rerank.yaml" not in res.stderr


def test_prompts_render_prints_the_messages(tmp_path: Path):
    res = run("prompts", "render", "rerank", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.index("--- system ---") < out.index("--- user ---")
    assert "Candidates:" in out and "«" in out  # demo ads, wrapped as data
    res = run("prompts", "render", "rerank-typo", cwd=tmp_path)
    assert res.returncode == 2 and "rerank" in res.stderr  # "did you mean"


def test_ingest_of_a_malformed_file_exits_2_with_file_and_line(tmp_path: Path):
    bad = tmp_path / "ads.jsonl"
    lines = (DEMO / "ads.jsonl").read_text().splitlines()[:2] + ['{"ad_id": "x-1", "title": ']
    bad.write_text("\n".join(lines) + "\n")
    res = run("ingest", "--ads", str(bad), "--data-dir", str(tmp_path / "var"), cwd=tmp_path)
    assert res.returncode == 2
    assert f"{bad}:3:" in res.stderr and "malformed JSON" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 demo ads: running shoes and laptops, enough for a selection, cheap to embed."""
    ads = [json.loads(line) for line in (DEMO / "ads.jsonl").read_text().splitlines()]
    keep = [a for a in ads if a["category"] in ("running shoes", "laptops")][:40]
    path = tmp_path_factory.mktemp("cli_catalog") / "ads.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in keep))
    return path


def test_ingest_then_select_prints_the_http_response_shape(tmp_path: Path, small_catalog: Path):
    var = tmp_path / "var"
    res = run("ingest", "--ads", str(small_catalog), "--history", str(DEMO / "impressions.jsonl"), "--data-dir", str(var), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ingested 40 ads" in res.stdout and "behaviour:" in res.stdout

    res = run("select", "--history", "run-001,run-002,nope", "--k", "2", "--data-dir", str(var), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert set(d) == set(SelectResponseBody.model_fields)
    SelectResponseBody.model_validate(d)
    ad_keys = {f.alias or name for name, f in AdOut.model_fields.items()}
    for ad in d["ads"]:
        assert set(ad) == ad_keys and set(ad["copy"]) == set(ad["original"]) == set(CopyOut.model_fields)
    assert [a["ad_id"][:4] for a in d["ads"]] == ["run-", "run-"]
    assert (d["llm_used"], d["degraded"], d["unknown_ids"]) == (False, False, ["nope"])
    assert not {"run-001", "run-002"} & {a["ad_id"] for a in d["ads"]}
    assert len(d["request_id"]) == 32 and d["prompt"] is None and set(PromptOut.model_fields) == {"name", "version", "sha256"}

    # logs are JSON lines on stderr, with the extra= fields of the logging call
    loaded = [r for r in log_lines(res.stderr) if r["message"] == "catalog index loaded"]
    assert loaded and loaded[0]["ads"] == 40 and loaded[0]["level"] == "INFO" and loaded[0]["logger"] == "retrieval.store"

    # a configured weights file that is not there: a clear error, not the shipped weights
    typo = tmp_path / "fusion.jsno"
    res = run("select", "--data-dir", str(var), cwd=tmp_path, env={"ADSELECT_WEIGHTS_PATH": str(typo)})
    assert res.returncode == 2 and res.stdout == ""
    assert f"ADSELECT_WEIGHTS_PATH: no such file: {typo}" in res.stderr and "Traceback" not in res.stderr
