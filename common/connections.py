"""Redis clients, made one way in every process: with connect and socket timeouts, so that no call
waits forever on a Redis that has gone, and with health checks on connections left idle, so that
one Redis restart costs a failed call, not a hung one. Celery's own connections get the same
timeouts in delivery.app."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from .settings import Settings


def _options(settings: Settings) -> dict:
    return {
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 15,
        "socket_keepalive": True,
    }


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **_options(settings))


def async_redis_client(settings: Settings, max_connections: int) -> aioredis.Redis:
    """A client whose calls wait (up to the socket timeout) for one of `max_connections` to be
    free, rather than failing when many requests need Redis at once."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=settings.redis_socket_timeout_s,
        **_options(settings),
    )
    return aioredis.Redis.from_pool(pool)
