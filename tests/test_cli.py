"""`adselect` as a user runs it: real subprocesses of the installed entry point, in a clean environment."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "data" / "demo"
ADSELECT = Path(sys.executable).with_name("adselect")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `adselect ARGS` from `cwd` (no .env there) with no ADSELECT_* variables but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_")}
    return subprocess.run(
        [str(ADSELECT), *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_prompts_list(tmp_path: Path):
    res = run("prompts", "list", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {line.split("\t", 1)[0]: line.split("\t") for line in res.stdout.splitlines()}
    _, version, sha, _ = rows["rerank"]
    assert version.startswith("v") and len(sha) == 12


def test_prompts_validate_passes_and_names_a_broken_file(tmp_path: Path):
    res = run("prompts", "validate", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "valid: rerank" in res.stdout

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


def test_ingest_then_select_prints_json(tmp_path: Path, small_catalog: Path):
    var = tmp_path / "var"
    res = run("ingest", "--ads", str(small_catalog), "--history", str(DEMO / "impressions.jsonl"), "--data-dir", str(var), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ingested 40 ads" in res.stdout and "behaviour:" in res.stdout

    res = run("select", "--history", "run-001,run-002,nope", "--k", "2", "--data-dir", str(var), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert [a["ad"]["ad_id"][:4] for a in d["ads"]] == ["run-", "run-"]
    assert (d["llm_used"], d["degraded"], d["unknown_ids"]) == (False, False, ["nope"])
    assert not {"run-001", "run-002"} & {a["ad"]["ad_id"] for a in d["ads"]}
