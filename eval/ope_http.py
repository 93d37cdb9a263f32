"""The traffic simulation (eval.ope_sim) against a RUNNING `adselect serve`: a subprocess on loopback.

`ServiceProcess` starts `python -m adselect.cli serve` over a data dir (LLM off, frequency caps off so the
same users can be served by every variant, the impression log and feedback store in a folder of its own),
waits for /healthz, and stops it (SIGTERM) or kills it (SIGKILL, for the crash proof).

`HttpService` is the simulation's `Service`: each arm is an experiment file with that one arm, switched in
with `POST /admin/reload` (the hot-reload path a deployment uses); `serve` is `POST /v1/select` with the
user's 20 logged candidates (reading each ad's `propensity` and the `arm`), `click` is `POST /v1/events`,
`records` reads the service's impression log joined with its feedback store. The service chooses request
ids; the simulation's own ids are mapped to them and back.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from eval.ope_sim import Served, SimUser
from selection.feedback import FeedbackStore
from selection.impression_log import iter_log_records

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    data_dir: Path
    work_dir: Path  # experiment file, impression log, feedback store, server log
    api_key: str = "ope-sim-key-0123456789"
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def experiment_path(self) -> Path:
        return self.work_dir / "experiment.json"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "impressions"

    @property
    def feedback_path(self) -> Path:
        return self.work_dir / "feedback.sqlite"

    @property
    def server_log(self) -> Path:
        return self.work_dir / "server.log"

    def start(self, *, timeout_s: float = 120.0) -> "ServiceProcess":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.experiment_path.exists():
            self.experiment_path.write_text(json.dumps({"name": "sim", "arms": [{"name": "default", "share": 1.0}]}))
        self.port = free_port()
        env = {
            **os.environ,
            "ADSELECT_API_KEYS": self.api_key,
            "ADSELECT_EXPERIMENT_PATH": str(self.experiment_path),
            "ADSELECT_IMPRESSION_LOG_DIR": str(self.log_dir),
            "ADSELECT_FEEDBACK_PATH": str(self.feedback_path),
            "ADSELECT_CAP_MAX_PER_AD": "0",
            "ADSELECT_CAP_MAX_PER_ADVERTISER": "0",
            "ADSELECT_MAX_INFLIGHT": "0",
            "ADSELECT_USER_KEY_SECRET": "ope-simulation-secret-0123456789",
            **self.env,
        }
        # one process: /admin/reload (which switches the simulated arms) reaches every request, and a SIGKILL
        # takes the whole service down (`adselect serve` otherwise starts one worker per CPU)
        cmd = [sys.executable, "-m", "adselect.cli", "serve", "--no-llm", "--workers", "1", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        out = self.server_log.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adselect serve exited with {self.proc.returncode}; see {self.server_log}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"adselect serve not ready in {timeout_s}s; see {self.server_log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class HttpService:
    """`eval.ope_sim.Service` over the running endpoint; `arms` maps an arm name to its variant document."""

    def __init__(self, process: ServiceProcess, *, arms: Mapping[str, Mapping[str, Any]]):
        self.process = process
        self.arms = dict(arms)
        self.client = httpx.Client(base_url=process.base_url, headers={"X-API-Key": process.api_key}, timeout=60.0)
        self.current: str | None = None
        self.ids: dict[str, str] = {}  # simulation request id -> the service's request id
        self.back: dict[str, str] = {}

    def use_arm(self, arm: str) -> None:
        if arm == self.current:
            return
        doc = {"name": f"sim-{arm}", "arms": [{"name": arm, "share": 1.0, "variant": dict(self.arms[arm])}]}
        self.process.experiment_path.write_text(json.dumps(doc))
        r = self.client.post("/admin/reload")
        if r.status_code != 200:
            raise RuntimeError(f"reload for arm {arm!r} refused: {r.text}")
        self.current = arm

    def serve(self, user: SimUser, *, arm: str, k: int, request_id: str) -> Served:
        self.use_arm(arm)
        # the simulation's own id as the impression id: the service draws what the in-process simulation draws
        # for it (exploration is seeded by arm and impression id), so a run repeats
        body = {"user_id": user.user_id, "history": user.history, "candidates": user.candidates, "k": k, "use_llm": False,
                "impression_id": request_id}
        r = self.client.post("/v1/select", json=body)
        r.raise_for_status()
        d = r.json()
        if d["arm"] != arm:
            raise RuntimeError(f"served by arm {d['arm']!r}, expected {arm!r}")
        self.ids[request_id] = d["request_id"]
        self.back[d["request_id"]] = request_id
        return Served([a["ad_id"] for a in d["ads"]], [a["propensity"] for a in d["ads"]], d["arm"])

    def click(self, *, request_id: str, ad_id: str, event_id: str) -> None:
        rid = self.ids[request_id]  # event ids are global to the service: scope the simulation's to its decision
        r = self.client.post("/v1/events", json={"event_id": f"{rid}:{event_id}", "request_id": rid, "ad_id": ad_id, "type": "click"})
        r.raise_for_status()

    def records(self, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Every log record of a decision this simulation made (waits for the writer), joined with feedback."""
        deadline = time.monotonic() + timeout_s
        while True:
            recs = [r for r in iter_log_records(self.process.log_dir) if r["request_id"] in self.back]
            if len(recs) >= len(self.back) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        store = FeedbackStore(self.process.feedback_path)
        try:
            joined = list(store.join(recs))
        finally:
            store.close()
        for r in joined:
            r["service_request_id"] = r["request_id"]
            r["request_id"] = self.back[r["request_id"]]
        return joined

    def close(self) -> None:
        self.client.close()
