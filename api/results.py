"""Awaiting Celery results without parking a thread per request.

Celery's Redis result backend stores each result under `celery-task-meta-<id>` and publishes it
on a channel of that name. One pub/sub connection per API process subscribes to the pattern of
those channels once, and resolves the futures of the tasks it waits for: no subscribe and
unsubscribe per request. (Each API replica hears every result; it only decodes its own.) If a
message is missed (the connection dropped and came back, say), a periodic GET of the stored result
catches it, so no wait depends on pub/sub alone, and every wait ends at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import redis.asyncio as aioredis
from celery import Celery

from common import keys
from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 1.0


class ResultWaiter:
    def __init__(self, client: aioredis.Redis, celery: Celery):
        self._client = client
        self._backend = celery.backend
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[str, asyncio.Future] = {}
        self._listener: asyncio.Task | None = None

    async def start(self) -> None:
        await self._pubsub.psubscribe(keys.result_channel("*"))
        self._listener = asyncio.create_task(self._listen(), name="embedq-results")

    async def close(self) -> None:
        if self._listener:
            self._listener.cancel()
        await self._pubsub.aclose()

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("result listener lost its connection; retrying")
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            task_id = message["channel"].decode().removeprefix(keys.RESULT_PREFIX)
            future = self._waiting.get(task_id)
            if future is not None and not future.done():
                future.set_result(message["data"])

    async def call(self, task_id: str, send: Callable[[], object], timeout: float) -> Any:
        """Subscribe to the task's result, `send` it, and return its value; raises the task's
        error, or ServiceUnavailable at the deadline."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = future
        try:
            send()
            return self._outcome(await self._await(task_id, future, timeout))
        finally:
            del self._waiting[task_id]

    async def _await(self, task_id: str, future: asyncio.Future, timeout: float) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise ServiceUnavailable(f"No worker answered within {timeout:.0f}s; try again later.")
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(left, _POLL_INTERVAL_S))
            except asyncio.TimeoutError:
                stored = await self._client.get(keys.result_channel(task_id))
                if stored is not None:
                    return stored

    def _outcome(self, payload: bytes) -> Any:
        meta = self._backend.decode_result(payload)
        if meta["status"] == "SUCCESS":
            return meta["result"]
        raise self._backend.exception_to_python(meta["result"])
