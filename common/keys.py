"""Every Redis key embedq writes itself (Celery's own keys are Celery's business)."""

from __future__ import annotations


def workers_alive(model: str, modality: str) -> str:
    """Sorted set: worker name -> unix time of its last heartbeat, for one model and modality."""
    return f"embedq:workers:{model}:{modality}"


INGEST_WORKERS_ALIVE = "embedq:workers:ingest"  # Sorted set: ingestion worker -> last heartbeat
SEARCH_WORKERS_ALIVE = "embedq:workers:search"  # Sorted set: search worker -> last heartbeat
# String: unix time a heartbeat last found a worker gone silent (common.heartbeat).
WORKER_DIED_AT = "embedq:worker-died-at"

RESULT_PREFIX = "celery-task-meta-"


def result_channel(task_id: str) -> str:
    """Where Celery's Redis result backend stores and publishes a task's result."""
    return f"{RESULT_PREFIX}{task_id}"


def worker_stats(worker: str) -> str:
    """Hash of one worker's batcher counters (batches, items, oom_splits, failed_batches), with
    its model and device; refreshed with each heartbeat, expiring when the worker is gone."""
    return f"embedq:worker-stats:{worker}"


def job(job_id: str) -> str:
    """Hash: a job's state and counters (see common.jobs)."""
    return f"embedq:job:{job_id}"


def job_file(job_id: str, index: int) -> str:
    """Hash: one uploaded file of a job: name, doc id, kind, status, counters, error."""
    return f"embedq:job:{job_id}:file:{index}"


def job_units_done(job_id: str) -> str:
    """Set: the pages / chunks of a job already counted, so a redelivered batch counts once."""
    return f"embedq:job:{job_id}:done"


def job_events(job_id: str) -> str:
    """Stream: the job's progress events, replayed to SSE clients from their Last-Event-ID."""
    return f"embedq:job:{job_id}:events"


def upload(job_id: str, index: int) -> str:
    """String: an uploaded file's bytes until its pages or chunks are queued."""
    return f"embedq:upload:{job_id}:{index}"


JOBS_OPEN = "embedq:jobs:open"  # Set: ids of jobs whose tasks are watched (common.jobs.ledger)
JOBS_SWEEP_LOCK = "embedq:jobs:sweep"  # String: held by the process sweeping for lost job tasks


def job_tasks(job_id: str) -> str:
    """Hash: task id -> msgpack [task name, kwargs] of a job's tasks not yet reported."""
    return f"embedq:job:{job_id}:tasks"


def job_tasks_sent(job_id: str) -> str:
    """Sorted set: task id -> unix time it was (last) sent, for the same tasks."""
    return f"embedq:job:{job_id}:tasks-sent"


def page_changes(collection: str) -> str:
    """Stream: a collection's page writes, document deletes and drops, in order (common.store.changes)."""
    return f"embedq:collection:{collection}:changes"
