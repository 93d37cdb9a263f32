"""SIGKILL during `adselect eval run`, then `--resume`: the same metrics as a run never interrupted.

The run is a real subprocess of the CLI on MIND (54 logged impressions), with the LLM systems served by
a real HTTP server on loopback (`FakeSlowLLMServer`: an OpenAI-compatible endpoint that answers slowly,
so the kill lands in the middle of the LLM phase). The process is killed once some LLM records are on
disk; a torn half line is appended as a write cut by the kill would leave it. The resume must drop the
torn line, run only what is missing, and produce metrics identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kernel.settings import REPO_ROOT
from eval.harness import RESULTS
from tests.eval.conftest import MIND

COMPARED = ("metrics", "ci", "n", "paired_vs_default", "calibration", "n_impressions")
SAMPLE = 12


class FakeSlowLLMServer:
    """A real OpenAI-compatible chat endpoint on 127.0.0.1 that ranks the ids of the output schema in
    reverse after `delay_s` (deterministic, so an interrupted and an uninterrupted run see the same answers)."""

    def __init__(self, delay_s: float):
        delay = delay_s

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                schema = body["response_format"]["schema"]
                ids = schema["properties"]["ranking"]["items"]["enum"]
                time.sleep(delay)
                content = json.dumps({"ranking": list(reversed(ids)), "justification": "You read similar stories", "headline": "", "description": ""})
                out = json.dumps({
                    "id": "fake", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeSlowLLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _cmd(out: Path, *, url: str, data_dir: Path, cache: Path, resume: bool = False) -> list[str]:
    return [
        sys.executable, "-m", "adselect.cli", "eval", "run",
        "--ads", str(MIND / "ads.jsonl"), "--impressions", str(MIND / "impressions_dev.jsonl"),
        "--systems", "random,popularity,default,llm,default+llm", "--llm-url", url, "--llm-sample", str(SAMPLE),
        "--no-position-bias", "--concurrency", "1", "--no-progress", "--data-dir", str(data_dir),
        "--llm-cache", str(cache), "--out", str(out), *(["--resume"] if resume else []),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_")}


def _llm_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for x in path.read_bytes().split(b"\n") if x.startswith(b'{"phase": "llm"'))


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_metrics(mind_report, eval_data_dir: Path, tmp_path: Path) -> None:
    # mind_report: the session's MIND catalog is in eval_data_dir already, so the subprocesses reuse it.
    with FakeSlowLLMServer(delay_s=0.4) as server:
        whole = subprocess.run(
            _cmd(tmp_path / "whole", url=server.base_url, data_dir=eval_data_dir, cache=tmp_path / "c1.sqlite"),
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert whole.returncode == 0, whole.stderr[-2000:]

        out = tmp_path / "killed"
        cmd = _cmd(out, url=server.base_url, data_dir=eval_data_dir, cache=tmp_path / "c2.sqlite")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while _llm_lines(out / RESULTS) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        done = _llm_lines(out / RESULTS)
        assert 3 <= done < SAMPLE, "the kill must land inside the LLM phase"
        assert not (out / "report.json").exists()
        with (out / RESULTS).open("ab") as fh:  # a line cut by the kill
            fh.write(b'{"phase": "llm", "impression_id": "N')

        resumed = subprocess.run(
            _cmd(out, url=server.base_url, data_dir=eval_data_dir, cache=tmp_path / "c2.sqlite", resume=True),
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = json.loads((tmp_path / "whole" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert a["llm"]["summary"]["llm_used"] == SAMPLE and b["llm"]["summary"]["llm_used"] == SAMPLE
    for key in COMPARED:
        assert b[key] == a[key], key
    assert b["llm"]["sample_metrics"] == a["llm"]["sample_metrics"]
    assert b["speed"]["fast"]["impressions"] == 0 and b["speed"]["llm"]["impressions"] == SAMPLE - done
    recs = [json.loads(x) for x in (out / RESULTS).read_text().splitlines()]
    keys = [(r["phase"], r["impression_id"]) for r in recs]
    assert len(keys) == len(set(keys)) == 54 + SAMPLE
