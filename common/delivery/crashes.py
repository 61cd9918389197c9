"""Poison inputs: a task that kills its worker runs a bounded number of times, then fails.

A message comes back `redelivered` when the worker that held it died: its lease lapsed, or its
pool process was lost (an OOM kill, a segfault in a renderer or a kernel). Any task the dead
worker held comes back so, the innocent with the guilty. A redelivered task is therefore run
alone (a model worker gives its inputs a forward pass of their own), inside `running`, which
counts the runs that began and never ended. Only the task that kills its worker while running
alone gathers such runs; once it has `max_runs` of them it is not run again, and its work is
failed with `gave_up`'s message. Tasks delivered for the first time pay nothing for this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis

from .. import keys


class Crashes:
    def __init__(self, client: redis.Redis, max_runs: int, ttl_s: int):
        self._client = client
        self.max_runs = max_runs
        self._ttl = ttl_s

    def count(self, task_id: str) -> int:
        """Runs of the task that began and did not end (its worker died during them)."""
        return int(self._client.get(keys.task_crashes(task_id)) or 0)

    def exhausted(self, task_id: str) -> bool:
        return self.count(task_id) >= self.max_runs

    def gave_up(self, task_id: str) -> str:
        return (
            f"gave up after {self.count(task_id)} runs of this work: the worker died each time it ran it "
            "(killed for memory, or crashed in a model kernel or a document renderer)"
        )

    @contextlib.contextmanager
    def running(self, task_id: str) -> Iterator[None]:
        """Count a run for as long as it lasts: a run that the process's death cuts short stays counted."""
        key = keys.task_crashes(task_id)
        with self._client.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, self._ttl)
            pipe.execute()
        try:
            yield
        finally:
            self._client.decr(key)
