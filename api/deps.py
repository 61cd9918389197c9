"""Dependency shortcuts for routes: settings, Redis, the dispatcher, the stores, and the caller."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Request

from common.errors import ServiceUnavailable
from common.jobs.events import EventFeed
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore
from common.registry import Registry
from common.settings import Settings
from common.store.blobs import BlobStore
from common.store.changes import PageChanges
from common.tenants import Principal

from .dispatch import Dispatcher
from .results import Gone

if TYPE_CHECKING:
    from common.store.milvus import MilvusStore


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> aioredis.Redis:
    return request.app.state.redis


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def get_models(request: Request) -> Registry:
    return request.app.state.registry


def get_gone(request: Request) -> Gone:
    """Whether the client has gone: a request whose caller has gone is withdrawn (api.results)."""
    return request.is_disconnected


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_ledger(request: Request) -> JobLedger:
    return request.app.state.ledger


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_events(request: Request) -> EventFeed:
    return request.app.state.events


def get_principal(request: Request) -> Principal:
    """Who the caller is, as api.auth found from its key before the route ran."""
    return request.state.principal


class LazyStore:
    """The Milvus store, connected on first use: the embedding routes never wait on Milvus, and
    the API starts while Milvus is still coming up."""

    def __init__(self, settings: Settings, changes: PageChanges):
        self._settings = settings
        self._changes = changes  # the API deletes documents and drops collections
        self._store: MilvusStore | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> MilvusStore:
        async with self._lock:
            if self._store is None:
                from common.store.milvus import MilvusStore  # pymilvus: only when a route needs it

                try:
                    self._store = await asyncio.to_thread(MilvusStore.connect, self._settings, self._changes)
                except Exception as exc:
                    where = self._settings.milvus_uri
                    raise ServiceUnavailable(f"The vector store at {where} is not reachable: {exc}") from exc
            return self._store

    async def call(self, method: str, *args: Any) -> Any:
        """`store.method(*args)` in a worker thread (pymilvus blocks); a Milvus that fails is a 503."""
        from pymilvus import MilvusException

        store = await self.get()
        try:
            return await asyncio.to_thread(getattr(store, method), *args)
        except MilvusException as exc:
            raise ServiceUnavailable(f"The vector store failed: {exc.message}") from exc


async def get_store(request: Request) -> LazyStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[LazyStore, Depends(get_store)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
RegistryDep = Annotated[Registry, Depends(get_models)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
GoneDep = Annotated[Gone, Depends(get_gone)]
LedgerDep = Annotated[JobLedger, Depends(get_ledger)]
EventsDep = Annotated[EventFeed, Depends(get_events)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
