"""The app factory `adselect serve --workers N` hands to uvicorn: each worker process builds its own app
(and, in the lifespan, its own services: catalog index, behaviour tables, models) once, from settings
read from the environment the CLI prepared (ADSELECT_*, PROMETHEUS_MULTIPROC_DIR)."""
from __future__ import annotations

import logging

from fastapi import FastAPI

from kernel.settings import Settings
from server.app import create_app
from server.logs import configure_logging, queue_logging
from server.reload_group import ReloadGroup


def factory() -> FastAPI:
    settings = Settings()
    configure_logging(level=logging.INFO, fmt=settings.log_format)
    if settings.log_queue_size:
        queue_logging(size=settings.log_queue_size)
    return create_app(settings, group=ReloadGroup.from_env())
