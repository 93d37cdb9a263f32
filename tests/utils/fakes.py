"""Fakes for what cannot be real in a test: a server that hangs on purpose, an LLM that replays queued answers.

Both go through the same interfaces as the real things (a TCP socket; the ChatLLMLike protocol).
"""
from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.llm import Completion, Message


class FakeHangingLLMServer:
    """A real TCP server on 127.0.0.1 that accepts connections, reads, and never answers.

        with FakeHangingLLMServer() as server:
            ChatLLM(base_url=server.base_url, ...)  # every call times out
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-hanging-llm", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.1)
            self.connections.append(conn)  # held open, read from, never answered
            for c in list(self.connections):
                try:
                    c.recv(65536)
                except (TimeoutError, OSError):
                    pass

    def __enter__(self) -> FakeHangingLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for c in self.connections:
            c.close()
        self._sock.close()


@dataclass
class FakeQueueLLM:
    """Implements ChatLLMLike by replaying queued raw answers (or raising queued exceptions), in order.

    Every call is recorded in `.calls` (messages, schema, timeout_s) so tests can inspect the prompt.
    """

    model: str = "fake-queue"
    answers: deque[str | BaseException] = field(default_factory=deque)
    calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"

    def enqueue(self, *answers: str | BaseException) -> FakeQueueLLM:
        self.answers.extend(answers)
        return self

    def _next(self, messages: Sequence[Message], schema: dict[str, Any], timeout_s: float) -> Completion:
        self.calls.append({"messages": list(messages), "schema": schema, "timeout_s": timeout_s})
        if not self.answers:
            raise AssertionError("FakeQueueLLM: no answer queued")
        answer = self.answers.popleft()
        if isinstance(answer, BaseException):
            raise answer
        return Completion(
            text=answer, prompt_tokens=None, completion_tokens=None, latency_ms=0.0, model=self.model,
            finish_reason=self.finish_reason,
        )  # fmt: skip

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        return self._next(messages, schema, timeout_s)


class FakeGarbageLLM(FakeQueueLLM):
    """Always answers the same non-JSON text."""

    def __init__(self, text: str = "Sure! Here are my favourite ads: the first one.") -> None:
        super().__init__(model="fake-garbage")
        self.text = text

    def _next(self, messages: Sequence[Message], schema: dict[str, Any], timeout_s: float) -> Completion:
        self.answers.append(self.text)
        return super()._next(messages, schema, timeout_s)



class FakeBrokenLLMServer:
    """A real HTTP server on 127.0.0.1 that answers every POST with status 200 and a broken body, the way a
    misconfigured gateway or a dying upstream does:

    - "no_choices": a JSON object without `choices` (langchain raises TypeError);
    - "html": an HTML error page served as text/html;
    - "truncated": a chat completion cut off mid-JSON (Content-Length matches what is sent).

        with FakeBrokenLLMServer("html") as server:
            ChatLLM(base_url=server.base_url, ...)  # every call fails with an unmapped SDK error
    """

    BODIES: dict[str, tuple[str, bytes]] = {
        "no_choices": ("application/json", b'{"id": "x", "object": "chat.completion", "model": "m", "usage": {}}'),
        "html": ("text/html", b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"),
        "truncated": (
            "application/json",
            b'{"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role": "assis',
        ),
    }

    def __init__(self, mode: str) -> None:
        import http.server

        content_type, body = self.BODIES[mode]
        self.mode = mode
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-broken-llm-{mode}", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeBrokenLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
