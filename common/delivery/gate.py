"""The fetch gate: a worker takes from its queues only what it can start soon.

Celery's prefetch counts messages, but a message may hold one input or hundreds (a page batch, a
bulk request), and a model worker's thread pool takes as many messages as it has threads. So the
worker would take far more work than its device can start soon, where no other worker can have
it. The gate counts the items (inputs, pages, chunks) of the tasks this worker holds, and once
they reach `limit` it lowers the consumer's prefetch to the messages already held, so nothing more
is fetched; as they finish, prefetch goes back up. Queued work waits in Redis, where any worker can
take it. At most one message is taken past the limit (the one whose arrival closes the gate).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker import state


class FetchGate:
    def __init__(self, limit: int, items_of: Callable[[str, dict[str, Any]], int]):
        """`items_of(task name, kwargs)`: how many items a task holds."""
        self.limit = max(limit, 1)
        self._items_of = items_of
        self._held: dict[str, int] = {}  # task id -> items
        self._lock = threading.Lock()
        self._qos = None  # the consumer's kombu.common.QoS
        self._open_value = 0  # its prefetch count when the gate is open

    def install(self, app: Celery) -> None:
        gate = self

        class Gate(bootsteps.StartStopStep):
            requires = ("celery.worker.consumer.tasks:Tasks",)

            def start(self, consumer) -> None:
                with gate._lock:
                    gate._qos = consumer.qos
                    gate._open_value = gate._open_value or consumer.qos.value
                    gate._apply()

        app.steps["consumer"].add(Gate)
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._finished, weak=False)
        signals.task_revoked.connect(self._revoked, weak=False)

    @property
    def held_items(self) -> int:
        return sum(self._held.values())

    def _received(self, request, **_: Any) -> None:
        with self._lock:
            self._held[request.id] = max(self._items_of(request.name, request.kwargs), 1)
            self._apply()

    def _finished(self, task_id: str, **_: Any) -> None:
        self._release(task_id)

    def _revoked(self, request, **_: Any) -> None:
        self._release(request.id)

    def _release(self, task_id: str) -> None:
        with self._lock:
            if self._held.pop(task_id, None) is not None:
                self._apply()

    def reconcile(self) -> None:
        """Forget tasks this worker no longer holds that no signal reported (a message rejected or
        of an unknown task, say), so that the gate never stays closed on work that is gone. The
        heartbeat calls it."""
        try:
            holding = {request.id for request in list(state.reserved_requests)}
        except RuntimeError:  # changed while copied: the next beat tries again
            return
        with self._lock:
            for task_id in [t for t in self._held if t not in holding]:
                del self._held[task_id]
            self._apply()

    def _apply(self) -> None:
        """Set the prefetch the consumer applies at its next turn (under the lock)."""
        if self._qos is None:
            return
        closed = self.held_items >= self.limit
        # Prefetch 0 would mean "no limit" to kombu: a closed gate holds at least one message.
        self._qos.value = max(len(self._held), 1) if closed else self._open_value
