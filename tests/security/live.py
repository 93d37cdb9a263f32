"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need real sockets.

    with LiveServer(create_app(settings, services=svc)) as server:
        httpx.post(f"{server.url}/v1/select", json=...)

uvicorn runs with `log_config=None`, so its loggers (access log included) propagate to the root logger
where tests can read them. The server stops on exit (graceful, bounded by `stop_timeout_s`).
"""
from __future__ import annotations

import threading
import time

import uvicorn

from agent.local_server import free_port


class LiveServer:
    def __init__(self, app, *, startup_timeout_s: float = 15.0, stop_timeout_s: float = 15.0):
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on", access_log=True, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=self.stop_timeout_s)
