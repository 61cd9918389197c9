"""Redis clients, made one way in every process: with connect and socket timeouts, so that no call
waits forever on a Redis that has gone, and with health checks on connections left idle, so that
one Redis restart costs a failed call, not a hung one. Celery's own connections get the same
timeouts in delivery.app. The embedding cache's clients (`cache=True`) reach its own Redis, with
its shorter timeout: a request never waits long on a cache."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from .settings import Settings


def _url_and_options(settings: Settings, cache: bool) -> tuple[str, dict]:
    connect_s, socket_s = (
        (settings.cache_timeout_s, settings.cache_timeout_s)
        if cache
        else (settings.redis_connect_timeout_s, settings.redis_socket_timeout_s)
    )
    options = {
        "socket_connect_timeout": connect_s,
        "socket_timeout": socket_s,
        "health_check_interval": 15,
        "socket_keepalive": True,
    }
    return (settings.cache_url if cache else settings.redis_url), options


def redis_client(settings: Settings, cache: bool = False) -> redis.Redis:
    url, options = _url_and_options(settings, cache)
    return redis.Redis.from_url(url, **options)


def async_redis_client(settings: Settings, max_connections: int, cache: bool = False) -> aioredis.Redis:
    """A client whose calls wait (up to the socket timeout) for one of `max_connections` to be
    free, rather than failing when many requests need Redis at once."""
    url, options = _url_and_options(settings, cache)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=options["socket_timeout"], **options
    )
    return aioredis.Redis.from_pool(pool)
