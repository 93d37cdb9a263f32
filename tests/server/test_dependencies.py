"""No route dependency runs on FastAPI's thread pool: every dependency of every route is a coroutine
function (a plain `def` one costs a thread hop per request on the event loop's hot path)."""
from __future__ import annotations

import inspect

from fastapi.routing import APIRoute

from server.app import create_app


def _calls(dependant):
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def test_every_route_dependency_is_async(demo_settings):
    app = create_app(demo_settings)
    sync = {
        (route.path, getattr(call, "__name__", repr(call)))
        for route in app.routes
        if isinstance(route, APIRoute)
        for call in _calls(route.dependant)
        if not (inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(getattr(call, "__call__", None)))
    }
    assert not sync, f"dependencies run on the thread pool: {sorted(sync)}"
