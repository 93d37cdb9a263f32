"""A real HTTP server on 127.0.0.1 that answers every POST with one canned body (a garbage LLM server).

    with FakeCannedLLMServer(body=b"<html>gateway</html>", content_type="text/html") as server:
        LogprobChatLLM(base_url=server.base_url, ...)  # every call gets that body
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def chat_completion(content: str = "A", *, logprobs: Any = None) -> bytes:
    """An OpenAI chat.completion body with `content` and the given `logprobs` field."""
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }).encode()  # fmt: skip


class FakeCannedLLMServer:
    def __init__(self, *, body: bytes, status: int = 200, content_type: str = "application/json") -> None:
        canned = (status, content_type, body)
        self.requests: list[dict[str, Any]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    requests.append(json.loads(raw))
                except ValueError:
                    requests.append({"raw": raw.decode(errors="replace")})
                code, ctype, payload = canned
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-canned-llm", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeCannedLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
