"""The one way the service opens Redis (frequency caps, the shared copy cache): the settings' URL, connect and read
timeouts of `redis_timeout_s`, and no retries (redis-py retries with backoff by default), so a dead or hung Redis
costs a request at most one timeout."""
from __future__ import annotations

from typing import Any

from kernel.settings import Settings


def redis_from_settings(settings: Settings) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not settings.redis_url:
        raise ValueError("redis_url is not set")
    t = settings.redis_timeout_s
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=t, socket_timeout=t, retry=Retry(NoBackoff(), 0))
