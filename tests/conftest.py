"""Shared fixtures, kept few. `local_llm_url`: one real llama.cpp server (bundled SmolLM2) per session."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from adselect.settings import Settings


@pytest.fixture(scope="session")
def local_llm_url() -> Iterator[str]:
    """Base URL (http://127.0.0.1:PORT/v1) of a real `llama_cpp.server` started once for the session.

    The model answers to `Settings().llm_model`; the server is stopped at the end of the session.
    """
    from agent.local_server import LocalLLMServer, free_port

    with LocalLLMServer.from_settings(Settings(_env_file=None), port=free_port()) as server:
        yield server.base_url

