"""Awaiting Celery results without parking a thread per request, and sending lost tasks again.

Celery's Redis result backend stores each result under `celery-task-meta-<id>` and publishes it
on a channel of that name. One pub/sub connection per API process subscribes to the pattern of
those channels once, and resolves the futures of the tasks it waits for: no subscribe and
unsubscribe per request. (Each API replica hears every result; it only decodes its own.) If a
message is missed (the connection dropped and came back, say), a periodic GET of the stored result
catches it, so no wait depends on pub/sub alone, and every wait ends at its deadline. A result is
deleted once read (in batches, every second).

Every `lost_task_check_s` a sweep (common.delivery.lost.sweep) looks for the tasks waited on since
before a worker was last found dead (and not seen in flight since); one the broker lost with it
is sent again under its id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from redis import RedisError

from common import keys
from common.delivery.lost import sweep
from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 1.0  # also how soon a caller's going away is noticed
_FORGET_S = 1.0  # read results are deleted in batches this often, not one round trip per request

Gone = Callable[[], Awaitable[bool]]  # whether the caller has gone (Starlette's request.is_disconnected)


@dataclass
class _Waiting:
    future: asyncio.Future
    queue: str
    send: Callable[[], object]
    known_at: float  # when it was sent, or last seen queued or held


class ResultWaiter:
    def __init__(self, client: aioredis.Redis, sync_client: redis.Redis, celery: Celery, lost_task_check_s: float):
        self._client = client
        self._sync_client = sync_client  # for the sweep, in a thread
        self._celery = celery
        self._backend = celery.backend
        # Results reach this process through its one pattern subscription (`start`). Celery's Redis
        # backend would also SUBSCRIBE to each sent task's channel, a blocking round trip per
        # request, on a connection nobody reads, where every result would then pile up unread.
        self._backend.on_task_call = lambda producer, task_id: None
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[str, _Waiting] = {}
        self._check_s = lost_task_check_s
        self._background: list[asyncio.Task] = []
        self.resent = 0  # tasks sent again because the broker lost them
        self.revoked = 0  # tasks withdrawn because their caller went away
        self._read: list[str] = []  # tasks whose result was read, to delete (every _FORGET_S)

    async def start(self) -> None:
        await self._pubsub.psubscribe(keys.result_channel("*"))
        self._background = [
            asyncio.create_task(self._listen(), name="embedq-results"),
            asyncio.create_task(self._sweep(), name="embedq-lost-tasks"),
            asyncio.create_task(self._forget_forever(), name="embedq-forget-results"),
        ]

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await self._forget()
        await self._pubsub.aclose()

    async def _forget(self) -> None:
        """Delete the results read since the last time: a result is kept only until it is read."""
        read, self._read = self._read, []
        if read:
            await self._client.unlink(*(keys.result_channel(task_id) for task_id in read))

    async def _forget_forever(self) -> None:
        while True:
            await asyncio.sleep(_FORGET_S)
            try:
                await self._forget()
            except RedisError as exc:
                log.warning("deleting read results failed (%s); they expire anyway", exc)

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:  # Redis restarting: the subscription comes back with the connection
                log.warning("result listener lost its connection (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            task_id = message["channel"].decode().removeprefix(keys.RESULT_PREFIX)
            waiting = self._waiting.get(task_id)
            if waiting is not None and not waiting.future.done():
                waiting.future.set_result(message["data"])

    async def call(
        self,
        task_id: str,
        queue: str,
        send: Callable[[], object],
        timeout: float,
        gone: Gone | None = None,
        sent: Callable[[], None] | None = None,
    ) -> Any:
        """Wait for the result of the task `send` sends to `queue` and return its value; raises the
        task's error, or ServiceUnavailable at the deadline. `send` may be called again. When
        `gone()` says the caller has gone, the task is revoked: a worker that holds it drops it
        without computing it. `sent()` is called once the message has left (or failed to)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = _Waiting(future, queue, send, time.time())
        try:
            # Sending blocks (kombu is synchronous, and retries a Redis that is away): not on the loop.
            try:
                await asyncio.to_thread(send)
            finally:
                if sent is not None:
                    sent()
            payload = await self._await(task_id, future, timeout, gone)
            self._read.append(task_id)
            return self._outcome(payload)
        finally:
            del self._waiting[task_id]

    async def _await(self, task_id: str, future: asyncio.Future, timeout: float, gone: Gone | None) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise ServiceUnavailable(f"No worker answered within {timeout:.0f}s; try again later.")
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(left, _POLL_INTERVAL_S))
            except asyncio.TimeoutError:
                if gone is not None and await gone():
                    await asyncio.to_thread(self._celery.control.revoke, task_id)
                    self.revoked += 1
                    raise ServiceUnavailable("The client went away; its request was withdrawn.") from None
                stored = await self._client.get(keys.result_channel(task_id))
                if stored is not None:
                    return stored

    def _outcome(self, payload: bytes) -> Any:
        meta = self._backend.decode_result(payload)
        if meta["status"] == "SUCCESS":
            return meta["result"]
        raise self._backend.exception_to_python(meta["result"])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            try:
                await self.resend_lost()
            except asyncio.CancelledError:
                raise
            except RedisError as exc:
                log.warning("looking for lost tasks failed (%s); trying again at the next sweep", exc)
            except Exception:
                log.exception("looking for lost tasks failed; trying again at the next sweep")

    async def resend_lost(self) -> None:
        waiting = dict(self._waiting)
        tracked = {task_id: w.known_at for task_id, w in waiting.items()}
        lost, seen, looked_at = await asyncio.to_thread(sweep, self._sync_client, tracked, lambda t: [waiting[t].queue])
        for task_id in seen:
            if task_id in self._waiting:
                self._waiting[task_id].known_at = looked_at
        for task_id in lost:
            if task_id in self._waiting:
                log.warning(
                    "task %s vanished from %s with a dead worker; sending it again", task_id, waiting[task_id].queue
                )
                self._waiting[task_id].known_at = looked_at
                await asyncio.to_thread(self._waiting[task_id].send)
                self.resent += 1
