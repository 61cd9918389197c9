"""Worker heartbeats: each live worker keeps its name, with the time, in a sorted set per queue
group (`keys.workers_alive`), and drops the names that have gone silent. Dropping one records the
time in `keys.WORKER_DIED_AT`: only a worker that dies can lose a task (delivery.lost), so
senders look for lost tasks only after that time moves. `live_workers` is the one reading of "which
workers are live".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .. import keys

log = logging.getLogger(__name__)


def live_workers(client: Any, key: str, ttl_s: float) -> Any:
    """The names in heartbeat set `key` that beat within `ttl_s`, from `client` (a Redis client or
    pipeline, synchronous or asyncio: whatever its `zrangebyscore` returns)."""
    return client.zrangebyscore(key, time.time() - ttl_s, "+inf")


def beat(client: redis.Redis, sets: list[str], name: str, ttl_s: float) -> None:
    """Mark `name` live in each of `sets`, and drop the names silent for longer than `ttl_s`."""
    now = time.time()
    with client.pipeline() as pipe:
        for key in sets:
            pipe.zadd(key, {name: now})
            pipe.zremrangebyscore(key, 0, now - ttl_s)
        dropped = pipe.execute()[1::2]
    if any(dropped):
        client.set(keys.WORKER_DIED_AT, now)


def start_heartbeat(
    client: redis.Redis,
    sets: list[str],
    name: str,
    ttl_s: float,
    alive: Callable[[], bool] = lambda: True,
    extra: Callable[[], None] = lambda: None,
) -> threading.Thread:
    """A daemon thread that beats every third of `ttl_s` while `alive()`, running `extra` after
    each beat, and takes the name out of the sets when `alive()` turns false."""

    def run() -> None:
        while alive():
            try:
                beat(client, sets, name, ttl_s)
                extra()
            except redis.RedisError:
                log.warning("heartbeat to Redis failed", exc_info=True)
            time.sleep(max(ttl_s / 3, 0.5))
        with client.pipeline() as pipe:
            for key in sets:
                pipe.zrem(key, name)
            pipe.execute()

    thread = threading.Thread(target=run, name="embedq-heartbeat", daemon=True)
    thread.start()
    return thread
