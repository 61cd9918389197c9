"""The ledger of an ingestion job's tasks in flight, kept until they report, so that a task the
broker lost with a dying worker (delivery.lost) is sent again and the job still finishes with every
page and chunk.

Senders (the API for a job's files, the ingestion worker for their page and chunk batches) send
through `JobLedger.send`, which keeps a copy of the task; a task forgets its copy when it has
counted its work on the job. The job watcher (jobs.watch) sweeps every `lost_task_check_s`; each
task is stamped with when it was last known in flight, so a sweep looks only at tasks not seen
since a worker was last found dead. A lost one is sent again under its id, which is safe because
every write and count of a job is idempotent. The ledger also says which queues a job still
waits on, and counts the items it sends to each model (keys.ITEMS).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import msgpack
import redis
from celery import Celery

from .. import keys
from ..contract import INGEST_QUEUE, INGEST_TASK, embed_queue_parts, task_items, task_queue
from ..delivery.lost import sweep

log = logging.getLogger(__name__)


class JobLedger:
    def __init__(self, client: redis.Redis, celery: Celery, ttl_s: int):
        self._client = client
        self._celery = celery
        self._ttl = ttl_s

    def send(self, job_id: str, name: str, kwargs: dict[str, Any]) -> str:
        """Keep a copy of the task, count its items as sent to its model, and send it."""
        task_id = str(uuid.uuid4())
        queue = task_queue(name, kwargs)
        with self._client.pipeline() as pipe:
            pipe.sadd(keys.JOBS_OPEN, job_id)
            pipe.hset(keys.job_tasks(job_id), task_id, msgpack.packb([name, kwargs]))
            pipe.hset(keys.job_tasks_queue(job_id), task_id, queue)
            pipe.zadd(keys.job_tasks_sent(job_id), {task_id: time.time()})
            for key in (keys.job_tasks(job_id), keys.job_tasks_queue(job_id), keys.job_tasks_sent(job_id)):
                pipe.expire(key, self._ttl)
            if name != INGEST_TASK:
                model, modality = embed_queue_parts(queue)
                pipe.hincrby(keys.ITEMS, f"sent:{model}:{modality}", task_items(name, kwargs))
            pipe.execute()
        self._celery.send_task(name, kwargs=kwargs, task_id=task_id)
        return task_id

    def done(self, job_id: str, task_id: str) -> None:
        """Forget a task that has counted its work on the job."""
        with self._client.pipeline() as pipe:
            pipe.hdel(keys.job_tasks(job_id), task_id)
            pipe.hdel(keys.job_tasks_queue(job_id), task_id)
            pipe.zrem(keys.job_tasks_sent(job_id), task_id)
            pipe.execute()

    def open_jobs(self) -> list[str]:
        """The jobs with tasks sent through the ledger that have not been forgotten."""
        return [raw.decode() for raw in self._client.smembers(keys.JOBS_OPEN)]

    def forget(self, job_id: str) -> None:
        """Stop watching a job that has ended (or expired)."""
        with self._client.pipeline() as pipe:
            pipe.srem(keys.JOBS_OPEN, job_id)
            pipe.delete(keys.job_tasks(job_id), keys.job_tasks_queue(job_id), keys.job_tasks_sent(job_id))
            pipe.execute()

    def pending_queues(self, job_id: str) -> dict[str, str]:
        """Task id -> queue, for the job's tasks that have not reported."""
        return {t.decode(): q.decode() for t, q in self._client.hgetall(keys.job_tasks_queue(job_id)).items()}

    def ended_unreported(self, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(task id, name, kwargs) of the job's tasks that ended (Celery has their result) without
        reporting their work: a task that raised before it could count it."""
        pending = list(self.pending_queues(job_id))
        with self._client.pipeline(transaction=False) as pipe:
            for task_id in pending:
                pipe.exists(keys.result_channel(task_id))
            ended = [task_id for task_id, exists in zip(pending, pipe.execute()) if exists]
        found = []
        for task_id in ended:
            packed = self._client.hget(keys.job_tasks(job_id), task_id)
            if packed is not None:
                found.append((task_id, *msgpack.unpackb(packed)))
        return found

    def resend_lost(self, job_id: str) -> int:
        """Look for the job's tasks that a dying worker took with it (delivery.lost.sweep) and send
        them again under their ids. Returns how many."""
        queues = self.pending_queues(job_id)
        tracked = {
            t.decode(): known for t, known in self._client.zrange(keys.job_tasks_sent(job_id), 0, -1, withscores=True)
        }
        lost, seen, looked_at = sweep(self._client, tracked, lambda task_id: [queues.get(task_id, INGEST_QUEUE)])
        if seen:
            self._client.zadd(keys.job_tasks_sent(job_id), dict.fromkeys(seen, looked_at), xx=True)
        resent = 0
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
