"""Watching the open jobs, so that every job ends: one process at a time (the ingestion workers and
the API all run the watcher; a Redis lock lets one of them watch each round), every
`lost_task_check_s`, it

- sends again the tasks a dying worker took with it (jobs.ledger);
- finds the jobs whose pending work no live worker takes (no worker for its model and modality, or
  no ingestion worker), says so on the job (`waiting`, and a `waiting` event), and fails a job that
  has waited so for `job_stall_timeout_s`, instead of leaving it open for the job TTL;
- counts as failed the work of a task that ended without reporting it (it raised before it could);
- forgets the jobs that have ended, and deletes what is left of their uploads and page images.
"""

from __future__ import annotations

import logging
import threading
import uuid

import redis

from .. import keys
from ..contract import INGEST_QUEUE, INGEST_TASK, embed_queue_parts
from ..delivery.heartbeat import live_workers
from ..delivery.lost import SECOND_LOOK_S
from .ledger import JobLedger
from .state import JobStore
from .units import task_units

log = logging.getLogger(__name__)


def _idle(queue: str) -> str:
    """What a job waits for when no live worker serves `queue`."""
    if queue == INGEST_QUEUE:
        return "no live ingestion worker"
    model, modality = embed_queue_parts(queue)
    return f"no live worker serves {model} ({modality})"


class JobWatch:
    def __init__(
        self, client: redis.Redis, jobs: JobStore, ledger: JobLedger, heartbeat_ttl_s: float, stall_timeout_s: float
    ):
        self._client, self._jobs, self._ledger = client, jobs, ledger
        self._ttl, self._stall = heartbeat_ttl_s, stall_timeout_s
        self._stopped = threading.Event()

    def waiting_for(self, job_id: str) -> str | None:
        """Why the job's pending work cannot go on, or None when a live worker serves all of it."""
        queues = sorted(set(self._ledger.pending_queues(job_id).values()))
        with self._client.pipeline(transaction=False) as pipe:
            for queue in queues:
                live_workers(pipe, keys.workers_serving(queue), self._ttl)
            served = [bool(members) for members in pipe.execute()]
        reasons = [_idle(queue) for queue, ok in zip(queues, served) if not ok]
        return "; ".join(reasons) or None

    def round(self) -> None:
        """One pass over the open jobs."""
        for job_id in self._ledger.open_jobs():
            status, finished = self._client.hmget(keys.job(job_id), "status", "finished_at")
            if status is None or finished is not None:
                self._ledger.forget(job_id)
                self._jobs.blobs.delete_job(job_id)
                continue
            self._ledger.resend_lost(job_id)
            self._close_unreported(job_id)
            reason = self.waiting_for(job_id)
            waited = self._jobs.waiting(job_id, reason)
            if reason and waited >= self._stall:
                log.warning("job %s waited %ds with %s; failing it", job_id, waited, reason)
                self._jobs.abandon_job(job_id, f"{reason} for {waited}s (EMBEDQ_JOB_STALL_TIMEOUT_S)")

    def _close_unreported(self, job_id: str) -> None:
        """Count as failed the work of tasks that ended without counting it, so their job ends."""
        for task_id, name, kwargs in self._ledger.ended_unreported(job_id):
            error = f"internal error: task {task_id} ({name}) ended without reporting its work; see its worker's log"
            log.warning("job %s: %s", job_id, error)
            if name == INGEST_TASK:
                self._jobs.abandon(job_id, kwargs["index"], error)
            else:
                self._jobs.record(job_id, kwargs["index"], "failed", task_units(name, kwargs), error=error)
            self._ledger.done(job_id, task_id)

    def run_once(self, every_s: float) -> bool:
        """A round, if no other process holds this round's lock; True when this one ran it."""
        hold_ms = int((0.9 * every_s + SECOND_LOOK_S) * 1000)
        if not self._client.set(keys.JOBS_SWEEP_LOCK, uuid.uuid4().hex, nx=True, px=hold_ms):
            return False
        self.round()
        return True

    def start(self, every_s: float) -> threading.Thread:
        """A daemon thread that runs a round every `every_s` until `stop`."""

        def loop() -> None:
            while not self._stopped.wait(every_s):
                try:
                    self.run_once(every_s)
                except redis.RedisError as exc:
                    log.warning("watching the open jobs failed (%s); trying again", exc)
                except Exception:
                    log.exception("watching the open jobs failed; trying again")

        thread = threading.Thread(target=loop, name="embedq-job-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopped.set()
