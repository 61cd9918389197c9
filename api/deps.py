"""Dependency shortcuts for routes: settings, Redis, the dispatcher, and the API-key check."""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, Request

from common.errors import ServiceUnavailable, Unauthorized
from common.jobs.events import EventFeed
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore
from common.registry import Registry
from common.settings import Settings
from common.store.changes import PageChanges

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


def get_events(request: Request) -> EventFeed:
    return request.app.state.events


class LazyStore:
    """The Milvus store, connected on first use: the embedding routes never wait on Milvus, and
    the API starts while Milvus is still coming up."""

    def __init__(self, uri: str, changes: PageChanges):
        self._uri = uri
        self._changes = changes  # the API deletes documents and drops collections
        self._store: MilvusStore | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> MilvusStore:
        async with self._lock:
            if self._store is None:
                from common.store.milvus import MilvusStore  # pymilvus: only when a route needs it

                try:
                    self._store = await asyncio.to_thread(MilvusStore, self._uri, changes=self._changes)
                except Exception as exc:
                    raise ServiceUnavailable(f"The vector store at {self._uri} is not reachable: {exc}") from exc
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
GoneDep = Annotated[Gone, Depends(get_gone)]
LedgerDep = Annotated[JobLedger, Depends(get_ledger)]
EventsDep = Annotated[EventFeed, Depends(get_events)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """`Authorization: Bearer <key>` against EMBEDQ_API_KEYS; open when none are configured."""
    if not settings.api_keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given_bytes = given.strip().encode()
    # Compare against every key without stopping early, so timing reveals nothing.
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given_bytes, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'.")


Authorized = [Depends(require_api_key)]
