"""The ledger of an ingestion job's tasks in flight, kept until they report, so that a task the
broker lost with a dying worker (delivery.lost) is sent again and the job still finishes with every
page and chunk.

Senders (the API for a job's files, the ingestion worker for their page and chunk batches) send
through `JobLedger.send`, which keeps a copy of the task; a task forgets its copy when it has
counted its work on the job. Ingestion workers sweep every `lost_task_check_s`, one at a time
under a lock; each task is stamped with when it was last known in flight, so a sweep looks only
at tasks not seen since a worker was last found dead. A lost one is sent again under its id,
which is safe because every write and count of a job is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import msgpack
import redis
from celery import Celery

from .. import keys
from ..contract import INGEST_QUEUE, embed_queue
from ..delivery.lost import SECOND_LOOK_S, sweep

log = logging.getLogger(__name__)


class JobLedger:
    def __init__(self, client: redis.Redis, celery: Celery, ttl_s: int):
        self._client = client
        self._celery = celery
        self._ttl = ttl_s

    def send(self, job_id: str, name: str, kwargs: dict[str, Any]) -> str:
        task_id = str(uuid.uuid4())
        with self._client.pipeline() as pipe:
            pipe.sadd(keys.JOBS_OPEN, job_id)
            pipe.hset(keys.job_tasks(job_id), task_id, msgpack.packb([name, kwargs]))
            pipe.zadd(keys.job_tasks_sent(job_id), {task_id: time.time()})
            pipe.expire(keys.job_tasks(job_id), self._ttl)
            pipe.expire(keys.job_tasks_sent(job_id), self._ttl)
            pipe.execute()
        self._celery.send_task(name, kwargs=kwargs, task_id=task_id)
        return task_id

    def done(self, job_id: str, task_id: str) -> None:
        """Forget a task that has counted its work on the job."""
        with self._client.pipeline() as pipe:
            pipe.hdel(keys.job_tasks(job_id), task_id)
            pipe.zrem(keys.job_tasks_sent(job_id), task_id)
            pipe.execute()

    def _queues(self, job_id: str) -> list[str] | None:
        """Where a job's tasks go; None once the job has finished or expired."""
        model, finished = self._client.hmget(keys.job(job_id), "model", "finished_at")
        if model is None or finished is not None:
            return None
        model = model.decode()
        return [INGEST_QUEUE, embed_queue(model, "image"), embed_queue(model, "text")]

    def resend_lost(self) -> int:
        """One sweep (delivery.lost.sweep) over the open jobs' tasks; the lost ones are sent again.
        Returns how many."""
        resent = 0
        for raw in self._client.smembers(keys.JOBS_OPEN):
            job_id = raw.decode()
            queues = self._queues(job_id)
            if queues is None:
                self._client.srem(keys.JOBS_OPEN, job_id)
                self._client.delete(keys.job_tasks(job_id), keys.job_tasks_sent(job_id))
                continue
            tracked = {
                t.decode(): known
                for t, known in self._client.zrange(keys.job_tasks_sent(job_id), 0, -1, withscores=True)
            }
            lost, seen, looked_at = sweep(self._client, tracked, lambda _, job_queues=queues: job_queues)
            if seen:
                self._client.zadd(keys.job_tasks_sent(job_id), dict.fromkeys(seen, looked_at), xx=True)
            for task_id in lost:
                packed = self._client.hget(keys.job_tasks(job_id), task_id)
                if packed is None:  # it reported in the meantime
                    continue
                name, kwargs = msgpack.unpackb(packed)
                log.warning("task %s of job %s vanished with a dead worker; sending it again", task_id, job_id)
                self._client.zadd(keys.job_tasks_sent(job_id), {task_id: time.time()})
                self._celery.send_task(name, kwargs=kwargs, task_id=task_id)
                resent += 1
        return resent

    def start_sweeper(self, every_s: float) -> threading.Thread:
        """A daemon thread that sweeps every `every_s`, one process at a time across machines."""

        def sweep() -> None:
            while True:
                time.sleep(every_s)
                try:
                    hold_ms = int((0.9 * every_s + SECOND_LOOK_S) * 1000)
                    if self._client.set(keys.JOBS_SWEEP_LOCK, uuid.uuid4().hex, nx=True, px=hold_ms):
                        self.resend_lost()
                except Exception:
                    log.exception("sweeping for lost job tasks failed; trying again")

        thread = threading.Thread(target=sweep, name="embedq-job-sweeper", daemon=True)
        thread.start()
        return thread
