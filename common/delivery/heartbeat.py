"""Worker heartbeats: each live worker keeps its name, with the time, in a sorted set per queue
group (`keys.workers_alive`), and drops the names that have gone silent. Dropping one records the
time in `keys.WORKER_DIED_AT`: only a worker that dies can lose a task (delivery.lost), so
senders look for lost tasks only after that time moves; a worker that stops takes its name out
at once and records the time too. `live_workers` is the one reading of "which workers are live".
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


def leave(client: redis.Redis, sets: list[str], name: str) -> None:
    """Take `name` out of `sets` at once, and record the time as a worker's leaving: a message it
    took off a queue as it stopped is looked for as one a dead worker took (delivery.lost)."""
    with client.pipeline() as pipe:
        for key in sets:
            pipe.zrem(key, name)
        pipe.set(keys.WORKER_DIED_AT, time.time())
        pipe.execute()


class Heartbeat:
    """A daemon thread that beats every `every_s` while `alive()`, running `extra` after each beat
    (a worker renews its leases there), and leaves the sets when `alive()` turns false or `stop`
    is called, whichever comes first. While `serving()` is false (a worker whose upstreams are all
    down) it stays out of the sets but goes on running `extra`, and beats again once it is true."""

    def __init__(
        self,
        client: redis.Redis,
        sets: list[str],
        name: str,
        ttl_s: float,
        every_s: float,
        alive: Callable[[], bool] = lambda: True,
        extra: Callable[[], None] = lambda: None,
        serving: Callable[[], bool] = lambda: True,
    ):
        self._client, self._sets, self._name, self._ttl, self._every = client, sets, name, ttl_s, every_s
        self._alive, self._extra, self._serving = alive, extra, serving
        self._out = False  # out of the sets while not serving
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-heartbeat", daemon=True)
        self._redis_run: str | None = None  # the run id of the Redis server, to notice its restarts

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and leave now: the API routes nothing more to this worker."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._thread.join(timeout=self._every + 5)

    def _notice_restart(self) -> None:
        """A Redis that restarted may have lost its last second of writes (a task just sent, say):
        record the time as a worker's death, so that senders look for tasks gone missing."""
        run = self._client.info("server")["run_id"]
        if self._redis_run is not None and run != self._redis_run:
            log.warning("Redis restarted; senders will look for tasks it lost")
            self._client.set(keys.WORKER_DIED_AT, time.time())
        self._redis_run = run

    def _run(self) -> None:
        while self._alive() and not self._stopped.is_set():
            try:
                if self._serving():
                    beat(self._client, self._sets, self._name, self._ttl)
                    self._out = False
                elif not self._out:
                    log.warning("%s cannot serve now; out of the live sets until it can", self._name)
                    leave(self._client, self._sets, self._name)
                    self._out = True
                self._notice_restart()
                self._extra()
            except redis.RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            except Exception:  # a heartbeat that died would leave the worker unseen and its leases to lapse
                log.exception("heartbeat failed")
            self._stopped.wait(self._every)
        try:
            leave(self._client, self._sets, self._name)
        except redis.RedisError as exc:
            log.warning("leaving the heartbeat sets failed (they drop silent names anyway): %s", exc)
