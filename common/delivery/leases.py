"""Leases: a live worker's held messages are never restored to their queue, however long it holds them.

kombu's Redis transport records each message a worker takes in its `unacked` hash, with the time
it was taken in `unacked_index`, and every consuming worker restores to its queue any message
held for longer than the visibility timeout, whether or not its holder is alive. A large page
batch on a slow GPU, a long LibreOffice conversion or a full batcher outlasts any fixed timeout, so
each worker renews the time of every message it holds with each heartbeat (`Leases.renew`). Only a
dead worker's messages then age past the timeout: they go back to their queue within
`visibility_timeout_s` of its last beat (plus kombu's one-second restore interval), and another
worker runs them. The bound does not grow with the length of live work.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Celery, bootsteps

log = logging.getLogger(__name__)


class Leases:
    """The messages this worker process holds, read from its consumer's channel."""

    def __init__(self) -> None:
        self._qos = None  # kombu's Redis QoS of the task consumer's channel, once the consumer runs

    def install(self, app: Celery) -> None:
        """Add the consumer step that tells this object where the worker's held messages are."""
        leases = self

        class HeldMessages(bootsteps.StartStopStep):
            requires = ("celery.worker.consumer.tasks:Tasks",)

            def start(self, consumer) -> None:  # again after every reconnection
                leases._qos = consumer.task_consumer.channel.qos

            def stop(self, consumer) -> None:
                leases._qos = None

        app.steps["consumer"].add(HeldMessages)

    def held(self) -> list[str]:
        """The delivery tags of the messages held (taken and not yet acknowledged)."""
        qos = self._qos
        for _ in range(3):  # the consumer thread may change the map while it is copied
            try:
                return [] if qos is None else list(qos._delivered)
            except RuntimeError:
                continue
        return []

    def renew(self, client: redis.Redis) -> int:
        """Mark every held message as taken now; returns how many. A message acknowledged or
        restored meanwhile is left alone (`XX`: only tags still in the index are touched)."""
        qos, tags = self._qos, self.held()
        if qos is None or not tags:
            return 0
        key = qos.channel.global_keyprefix + qos.unacked_index_key
        now = time.time()
        with client.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.zadd(key, {tag: now}, xx=True)
            pipe.execute()
        return len(tags)
