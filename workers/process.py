"""What a worker process builds once, when it starts: its settings, one Redis connection pool, the
Celery app, and, made on first use, the job state, the job ledger, the vector store and the
embedding cache. The model worker adds its runtime, the search worker its searcher. Tasks read them
all from `current()`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import redis
from celery import Celery

from common.cache.client import SyncCache
from common.connections import redis_client
from common.delivery.app import create_celery_app
from common.delivery.crashes import Crashes
from common.delivery.leases import Leases
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore
from common.settings import Settings
from common.store.blobs import BlobStore

if TYPE_CHECKING:
    from common.store.milvus import MilvusStore

    from .model.runtime import Runtime
    from .search.scan import Searcher


@dataclass
class Process:
    settings: Settings
    name: str  # `kind@host:pid`, also the Celery worker's hostname and its heartbeat name
    redis: redis.Redis
    celery: Celery
    leases: Leases
    runtime: Runtime | None = None  # a model worker's model and batcher
    searcher: Searcher | None = None  # a search worker's pages

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore(self.settings.blob_location)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.redis, self.settings.job_ttl_s, self.blobs)

    @cached_property
    def ledger(self) -> JobLedger:
        return JobLedger(self.redis, self.celery, self.settings.job_ttl_s)

    @cached_property
    def crashes(self) -> Crashes:
        return Crashes(self.redis, self.settings.max_deliveries, self.settings.job_ttl_s)

    @cached_property
    def cache(self) -> SyncCache | None:
        """The embedding cache for pages and chunks (common.cache), or None when it is off."""
        if not self.settings.cache_on:
            return None
        return SyncCache(redis_client(self.settings, cache=True), self.settings.cache_ttl_s)

    @cached_property
    def store(self) -> MilvusStore:
        """The vector store, telling the page change feed of what it writes."""
        from common.store.changes import PageChanges
        from common.store.milvus import MilvusStore  # pymilvus: only in processes that write or search

        return MilvusStore.connect(self.settings, PageChanges(self.redis), self.settings.store_outage_s)


_current: Process | None = None


def start(settings: Settings, kind: str) -> Process:
    """This process's clients, built once; `kind` names the worker (a model name, `ingest`, `search`)."""
    global _current
    if _current is not None:
        raise RuntimeError("this process has started already")
    celery = create_celery_app(settings)
    celery.set_current()
    leases = Leases()
    leases.install(celery)
    name = f"{kind}@{socket.gethostname()}:{os.getpid()}"
    _current = Process(settings, name, redis_client(settings), celery, leases)
    return _current


def current() -> Process:
    if _current is None:
        raise RuntimeError("this process was not started as an embedq worker (workers.start)")
    return _current
