"""The gate a positive LLM weight must pass before `adselect eval tune` writes it: the injection test.

A positive `llm_coef` lets a hijacked model lift an ad by its LLM term (docs/SAFETY.md §3), so tune never
writes one on the strength of the fit alone. It writes the candidate weights to a temporary file and
runs the prompt-injection corpus through the endpoint at exactly those weights
(`tests/security/test_injection.py`, the compromised-model cases, with `ADSELECT_WEIGHTS_PATH` set to the
candidate); only a passing run lets the positive weight ship. Anything else (the test fails, cannot be
found, or times out) ships 0, and the weights' meta records the check either way.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from kernel.settings import REPO_ROOT

log = logging.getLogger(__name__)

INJECTION_TEST = Path("tests/security/test_injection.py")
SELECTION = "compromised"  # the fake fully hijacked model: deterministic, no LLM server needed
TIMEOUT_S = 1800


@dataclass(frozen=True)
class InjectionCheck:
    passed: bool
    command: str
    weights: str  # the candidate weights file the check ran at
    weights_sha256: str | None
    returncode: int | None
    detail: str  # the last lines of the test output (or why it could not run)

    def to_dict(self) -> dict:
        return asdict(self)


def run_injection_check(weights_path: Path, *, weights_sha256: str | None = None, repo: Path = REPO_ROOT) -> InjectionCheck:
    """Run the injection test at `weights_path` in a fresh interpreter; passed only on exit status 0."""
    test = repo / INJECTION_TEST
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INJECTION_TEST), "-k", SELECTION]
    shown = " ".join(cmd[1:])
    if not test.is_file():
        return InjectionCheck(False, shown, str(weights_path), weights_sha256, None, f"{test} not found: cannot check")
    env = {**os.environ, "ADSELECT_WEIGHTS_PATH": str(Path(weights_path).resolve())}
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return InjectionCheck(False, shown, str(weights_path), weights_sha256, None, f"timed out after {TIMEOUT_S}s")
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
    passed = done.returncode == 0
    log.info("injection check", extra={"passed": passed, "returncode": done.returncode, "weights": str(weights_path)})
    return InjectionCheck(passed, shown, str(weights_path), weights_sha256, done.returncode, tail)
