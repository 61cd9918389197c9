"""Every Redis key embedq writes itself (Celery's own keys are Celery's business)."""

from __future__ import annotations

from .contract import INGEST_QUEUE, SEARCH_QUEUE, embed_queue_parts


def workers_alive(model: str, modality: str) -> str:
    """Sorted set: worker name -> unix time of its last heartbeat, for one model and modality."""
    return f"embedq:workers:{model}:{modality}"


INGEST_WORKERS_ALIVE = "embedq:workers:ingest"  # Sorted set: ingestion worker -> last heartbeat
SEARCH_WORKERS_ALIVE = "embedq:workers:search"  # Sorted set: search worker -> last heartbeat
# Hash: search worker -> last heartbeat, kept past the heartbeat TTL: whose own queue to remove
SEARCH_QUEUES = "embedq:search:queues"
# String: unix time a heartbeat last found a worker gone silent, or a worker last stopped
# (common.delivery.heartbeat).
WORKER_DIED_AT = "embedq:worker-died-at"


# Hash: child name -> JSON {state, restarts, last_exit, failing} of the processes `embedq up`
# supervises, refreshed every half second (common.launch.stack).
STACK_CHILDREN = "embedq:stack:children"


def task_crashes(task_id: str) -> str:
    """String: runs of a redelivered task that began and did not end (common.delivery.crashes)."""
    return f"embedq:task:{task_id}:crashes"


# Hash: items sent to and embedded by the model workers, `sent:<model>:<modality>` and
# `embedded:<model>:<modality>` -> count, for `/metrics` (a duplicate run shows as embedded > sent).
ITEMS = "embedq:items"
# Hash: the embedding cache's lookups, `hits|misses|errors:<path>:<model>:<modality>` -> count, where
# path is `online` (the API's requests) or `ingest` (the model workers' pages and chunks). Kept here,
# not in the cache's own Redis, which evicts and may be the one that is unreachable.
CACHE_COUNTS = "embedq:cache-counts"
# String prefix of an embedding cache entry (in the cache's own Redis): common.cache.entries.
CACHE_ENTRY_PREFIX = "embedq:cache:"


def workers_serving(queue: str) -> str:
    """The heartbeat set of the workers that consume `queue` (a queue of common.contract)."""
    if queue == INGEST_QUEUE:
        return INGEST_WORKERS_ALIVE
    if queue == SEARCH_QUEUE or queue.startswith(f"{SEARCH_QUEUE}."):
        return SEARCH_WORKERS_ALIVE
    return workers_alive(*embed_queue_parts(queue))


RESULT_PREFIX = "celery-task-meta-"


def result_channel(task_id: str) -> str:
    """Where Celery's Redis result backend stores and publishes a task's result."""
    return f"{RESULT_PREFIX}{task_id}"


def worker_stats(worker: str) -> str:
    """Hash of one worker's batcher counters (batches, items, oom_splits, failed_batches), with
    its model and device; refreshed with each heartbeat, expiring when the worker is gone."""
    return f"embedq:worker-stats:{worker}"


# Sorted set: model worker whose backend adds stats of its own to its worker_stats hash (an upstream
# backend's replicas, JSON under `upstreams`) -> unix time it last published them. `/health/ready` and
# `/metrics` find those workers here, so a worker shows its upstreams while it is out of the live sets.
BACKEND_STATS_WORKERS = "embedq:workers:backend-stats"


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


JOBS_OPEN = "embedq:jobs:open"  # Set: ids of jobs whose tasks are watched (common.jobs.ledger)
JOBS_SWEEP_LOCK = "embedq:jobs:sweep"  # String: held by the process watching the open jobs (common.jobs.watch)


def job_tasks(job_id: str) -> str:
    """Hash: task id -> msgpack [task name, kwargs] of a job's tasks not yet reported."""
    return f"embedq:job:{job_id}:tasks"


def job_tasks_queue(job_id: str) -> str:
    """Hash: task id -> the queue it was sent to, for the same tasks."""
    return f"embedq:job:{job_id}:tasks-queue"


def job_tasks_sent(job_id: str) -> str:
    """Sorted set: task id -> unix time it was (last) sent, for the same tasks."""
    return f"embedq:job:{job_id}:tasks-sent"


def page_changes_applied(collection: str) -> str:
    """Hash: search worker -> the last entry of the collection's change feed it applied."""
    return f"embedq:collection:{collection}:applied"


def page_changes(collection: str) -> str:
    """Stream: a collection's page writes, document deletes and drops, in order (common.store.changes)."""
    return f"embedq:collection:{collection}:changes"
