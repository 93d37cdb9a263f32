"""What `adselect serve --workers N` prepares before uvicorn spawns its workers (each builds its own app
from the environment: adselect/app.py).

- Settings the CLI decided (data dir, LLM on/off, log format) go to the workers as ADSELECT_* variables.
- Limits that live in process memory are split: each worker gets 1/N of the in-flight limit and, without
  a Redis URL, of the rate limit (refill and burst, rounded up); with one the rate limit is shared in Redis. Frequency caps need no split: they live in SQLite
  (WAL, one write transaction per reservation) or Redis, shared and exact across workers.
- The bundled LLM, when one is needed, is started once here and shared (its URL goes to the workers).
- /metrics aggregates every worker: prometheus_client multiprocess mode, its files under
  data_dir/metrics/serve-<pid> (fresh at start, removed at exit). Gauges read off live objects at
  scrape time (in-flight, breaker) are those of the worker that answers the scrape.
- Hot reload reaches every worker: a reload generation under data_dir/reload/serve-<pid> (fresh at start,
  removed at exit; server/reload_group.py). POST /admin/reload on any worker reloads it, bumps the
  generation, and every other worker reloads from the same files before its next request. SIGHUP to
  the supervisor restarts the workers (uvicorn), which read the files again.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from kernel.settings import Settings
from server.reload_group import GROUP_ENV

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_overrides(settings: Settings, *, workers: int) -> dict[str, str]:
    """The ADSELECT_* variables every worker reads, beside whatever the environment already sets."""
    env = {
        "ADSELECT_DATA_DIR": str(settings.data_dir),
        "ADSELECT_LLM_ENABLED": "true" if settings.llm_enabled else "false",
        "ADSELECT_LOG_FORMAT": settings.log_format,
    }
    if settings.rate_limit_per_s > 0 and not settings.redis_url:  # in Redis it is one shared limit: no split
        env["ADSELECT_RATE_LIMIT_PER_S"] = repr(settings.rate_limit_per_s / workers)
        env["ADSELECT_RATE_LIMIT_BURST"] = str(max(1, math.ceil(settings.rate_limit_burst / workers)))
    if settings.max_inflight > 0:
        env["ADSELECT_MAX_INFLIGHT"] = str(max(1, math.ceil(settings.max_inflight / workers)))
    return env


@contextmanager
def worker_environment(settings: Settings, *, workers: int, log_format: str = "json") -> Iterator[dict[str, str]]:
    """Sets the workers' environment for the duration (restored after); yields what it set."""
    settings = settings.model_copy(update={"log_format": log_format})
    env = worker_overrides(settings, workers=workers)
    local = None
    if settings.llm_enabled and settings.llm_url is None:
        from agent.local_server import LocalLLMServer

        local = LocalLLMServer.from_settings(settings).start()
        env["ADSELECT_LLM_URL"] = local.base_url
        env["ADSELECT_LLM_MAX_CANDIDATES"] = str(settings.llm_candidates(bundled_model=True))
        log.info("started bundled local LLM at %s for %d workers", local.base_url, workers)
    metrics_dir = settings.data_dir / "metrics" / f"serve-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env[MULTIPROC_ENV] = str(metrics_dir)
    group_dir = settings.data_dir / "reload" / f"serve-{os.getpid()}"
    shutil.rmtree(group_dir, ignore_errors=True)
    group_dir.mkdir(parents=True)
    env[GROUP_ENV] = str(group_dir)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(group_dir, ignore_errors=True)
        if local is not None:
            local.stop()
