"""The FastAPI application: routers, error handling, and the clients its lifespan owns.

It imports no model code and no torch, so it starts in about a second.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.cache.client import AsyncCache
from common.connections import async_redis_client, redis_client
from common.delivery.app import create_celery_app
from common.jobs.events import EventFeed
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore
from common.jobs.watch import JobWatch
from common.registry import load_registry
from common.settings import Settings, get_settings
from common.store.blobs import BlobStore
from common.store.changes import PageChanges
from common.tenants import KeyRing

from . import compat
from .auth import KeyCheck
from .deps import LazyStore
from .dispatch import Dispatcher
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .metrics import RequestMetrics
from .results import ResultWaiter
from .routes import (
    collections,
    console,
    documents,
    embeddings,
    health,
    jobs,
    metrics,
    models,
    multivector,
    rerank,
    tokenize,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    ring = KeyRing.from_settings(settings)  # a key list that cannot be used stops the start here

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = async_redis_client(settings, max_connections=256)
        sync_client = redis_client(settings)
        celery = create_celery_app(settings)
        waiter = ResultWaiter(client, sync_client, celery, settings.lost_task_check_s)
        await waiter.start()
        app.state.settings = settings
        app.state.redis = client
        app.state.registry = registry = load_registry(settings.models_file)
        app.state.models_created = int(settings.models_file.stat().st_mtime)
        app.state.cache = cache = (
            AsyncCache(
                async_redis_client(settings, max_connections=256, cache=True),
                settings.cache_ttl_s,
                settings.cache_timeout_s,
            )
            if settings.cache_on
            else None
        )
        app.state.dispatcher = dispatcher = Dispatcher(settings, client, celery, waiter, registry, cache)
        dispatcher.start()
        app.state.waiter = waiter
        app.state.blobs = blobs = BlobStore(settings.blob_location)
        app.state.jobs = JobStore(sync_client, settings.job_ttl_s, blobs)
        app.state.ledger = JobLedger(sync_client, celery, settings.job_ttl_s)
        app.state.store = LazyStore(settings, PageChanges(sync_client))
        # One blocking read, on a connection of its own, for every SSE client of this process.
        reader = async_redis_client(settings, max_connections=1)
        app.state.events = events = EventFeed(client, reader, block_ms=1000)
        events.start()
        # The API watches the open jobs too: a job uploaded while no ingestion worker runs still ends.
        watch = JobWatch(
            sync_client, app.state.jobs, app.state.ledger, settings.worker_heartbeat_ttl_s, settings.job_stall_timeout_s
        )
        watch.start(settings.lost_task_check_s)
        try:
            yield
        finally:
            watch.stop()
            await events.close()
            await reader.aclose()
            await dispatcher.close()
            await waiter.close()
            if cache is not None:
                await cache.client.aclose()
            await client.aclose()

    app = FastAPI(
        title="embedq",
        summary="Queue-driven embedding service",
        version="0.1.0",
        lifespan=lifespan,
        # Vector payloads are huge; highlighting them freezes Swagger UI.
        swagger_ui_parameters={"syntaxHighlight": False},
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(KeyCheck, ring=ring)  # outside the size limit: an unknown caller's body is never read
    app.add_middleware(RequestMetrics)  # outermost: it also counts the 413s of BodySizeLimit
    for router in (
        health.router,
        models.router,
        embeddings.router,
        multivector.router,
        rerank.router,
        tokenize.router,
        collections.router,
        documents.router,
        jobs.router,
        metrics.router,
        console.router,
    ):
        app.include_router(router)
    compat.register(app, settings.compat)
    app.mount("/console", console.assets(), name="console")
    app.state.ring = ring
    return app
