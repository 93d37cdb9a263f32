"""Real dependency servers on loopback for the server tests: redis-server and `chroma run`, killed on purpose.

A missing binary fails the test (a missing real component must not pass as a skip).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.local_server import free_port


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, *, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """(redis://127.0.0.1:PORT/0, process); kill the process to take Redis away."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: `apt-get install -y redis-server` (listed in .ci/apt-packages.txt)")
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def ready() -> bool:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        _wait(ready, proc, what=f"redis-server on port {port}", timeout_s=10)
        yield url, proc
    finally:
        _stop(proc)


@contextmanager
def chroma_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """(http://127.0.0.1:PORT, process) of a real `chroma run`; kill the process to take Chroma away."""
    import httpx

    binary = shutil.which("chroma") or shutil.which("chroma", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("the `chroma` CLI is missing from the environment (it ships with the chromadb package)")
    port = free_port()
    log = (workdir / "chroma.log").open("wb")
    proc = subprocess.Popen(
        [binary, "run", "--path", str(workdir / "db"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait(ready, proc, what=f"chroma run on port {port}", timeout_s=30)
        yield url, proc
    finally:
        _stop(proc)
        log.close()
