"""Sending work to the workers' queues (embeddings, page searches) and awaiting the answer.

Before sending, a check that a warm worker serves the model and that its queue is not over its
limit makes a request fail fast (503 / 429) instead of waiting in vain. That check costs one Redis
round trip, made at most every CAPACITY_TTL_S per queue; requests in between reuse its answer.
The inputs sent are counted here and added to Redis every FLUSH_S, for `/metrics`. Past
EMBEDQ_MAX_IN_FLIGHT requests waiting at once, a request gets 429 rather than slowing the others.

With the embedding cache on (common.cache), only the inputs it does not hold are sent, and their
answer is merged with the cached ones in the inputs' order; a request that it answers whole needs
no worker at all, so it skips the capacity check.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from celery import Celery
from redis import RedisError

from common import keys
from common.cache.client import AsyncCache, add_counts
from common.contract import (
    EMBED_TASK,
    SEARCH_TASK,
    TOKENIZE_TASK,
    embed_kwargs,
    embed_queue,
    search_kwargs,
    search_queue,
    tokenize_kwargs,
)
from common.delivery.heartbeat import live_workers
from common.errors import QueueFull, ServiceUnavailable
from common.registry import Registry
from common.settings import Settings
from common.shards import plan
from common.vectors import check_answer_bytes, unpack

from .coalesce import Coalescer, Inputs
from .results import Gone, ResultWaiter

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """An answer: one array per input and the token count of each."""

    arrays: list[np.ndarray]
    tokens: list[int]

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Embedded:
        return cls(unpack(result), list(result["tokens"]))

    def split(self, sizes: list[int]) -> list[Embedded]:
        """The answers of consecutive runs of `sizes` inputs."""
        parts, start = [], 0
        for size in sizes:
            parts.append(Embedded(self.arrays[start : start + size], self.tokens[start : start + size]))
            start += size
        return parts


CAPACITY_TTL_S = 0.1
SEARCHER_CHECK_S = 0.5  # how soon a search notices that a search worker it waits on has stopped
FLUSH_S = 1.0  # how often the count of inputs sent is added to Redis


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        celery: Celery,
        waiter: ResultWaiter,
        registry: Registry,
        cache: AsyncCache | None = None,
    ):
        self._settings = settings
        self._client = client
        self._celery = celery
        self._waiter = waiter
        self._registry = registry
        self._cache = cache
        self._capacity: dict[str, tuple[float, int, int]] = {}  # queue -> (read at, live workers, depth)
        self._sent: Counter[tuple[str, str]] = Counter()  # inputs sent per (model, modality), not yet flushed
        self._in_flight = 0  # requests waiting on a worker (the loop is single-threaded: no lock)
        self.coalescer = Coalescer(Embedded.split)

    async def _read_capacity(self, queue: str, alive_key: str) -> tuple[int, int]:
        now = time.monotonic()
        cached = self._capacity.get(queue)
        if cached and now - cached[0] < CAPACITY_TTL_S:
            return cached[1], cached[2]
        async with self._client.pipeline(transaction=False) as pipe:
            live_workers(pipe, alive_key, self._settings.worker_heartbeat_ttl_s)
            pipe.llen(queue)
            members, depth = await pipe.execute()
        self._capacity[queue] = (now, len(members), depth)
        return len(members), depth

    async def _check(self, queue: str, alive_key: str, served: str) -> None:
        live, depth = await self._read_capacity(queue, alive_key)
        if not live:
            raise ServiceUnavailable(f"No worker is serving {served} right now; try again later.")
        if depth >= self._settings.queue_limit:
            raise QueueFull(f"The queue for {queue} is full ({depth} waiting); retry later.")

    async def check_capacity(self, model: str, modality: str) -> None:
        await self._check(embed_queue(model, modality), keys.workers_alive(model, modality), f"{model} ({modality})")

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever(), name="embedq-items-sent")

    async def close(self) -> None:
        self._flusher.cancel()
        await self.flush()

    async def flush(self) -> None:
        """Add the inputs sent since the last flush to the service's totals (keys.ITEMS), and the
        cache's lookups to its own (keys.CACHE_COUNTS)."""
        sent, self._sent = self._sent, Counter()
        looked_up = self._cache.take_counts() if self._cache else Counter()
        if sent or looked_up:
            async with self._client.pipeline(transaction=False) as pipe:
                for (model, modality), count in sent.items():
                    pipe.hincrby(keys.ITEMS, f"sent:{model}:{modality}", count)
                add_counts(pipe, looked_up)
                await pipe.execute()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except RedisError as exc:
                log.warning("counting the inputs sent failed: %s", exc)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self._in_flight >= self._settings.max_in_flight:
            raise QueueFull(f"This server is waiting on {self._in_flight} requests already; retry shortly.")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def _call(self, task: str, queue: str, kwargs: dict[str, Any], gone: Gone | None) -> Any:
        with self._admitted():
            return await self._send_and_wait(task, queue, kwargs, gone, self._settings.request_timeout_s)

    async def _send_and_wait(
        self,
        task: str,
        queue: str,
        kwargs: dict[str, Any],
        gone: Gone | None,
        timeout: float,
        sent: Callable[[], None] | None = None,
    ) -> Any:
        task_id = str(uuid.uuid4())
        # Expires with the wait: a worker drops a task whose caller has given up.
        expires = datetime.now(timezone.utc) + timedelta(seconds=timeout)

        def send() -> None:
            self._celery.send_task(task, kwargs=kwargs, task_id=task_id, expires=expires)

        return await self._waiter.call(task_id, queue, send, timeout, gone, sent)

    async def embed(
        self,
        model: str,
        modality: str,
        inputs: list[dict[str, Any]],
        gone: Gone | None = None,
        cache: bool = True,
        **options: Any,
    ) -> Embedded:
        """Embed `inputs` on a worker of `model`, those the cache holds from it unless `cache` is
        false; `gone()` says whether the caller has gone."""
        spec = self._registry.specs.get(model)
        if not (cache and self._cache and spec):
            return await self._compute(model, modality, inputs, gone, options)
        lookup = await self._cache.lookup(spec, modality, inputs, options)
        computed = Embedded([], [])
        if missing := lookup.missing:
            computed = await self._compute(model, modality, [inputs[i] for i in missing], gone, options)
            await self._cache.store(lookup, computed.arrays, computed.tokens)
        arrays, tokens = lookup.merge(computed.arrays, computed.tokens)
        # The worker bounds the answer it computes; the cached inputs add to it.
        check_answer_bytes(sum(a.nbytes for a in arrays), self._settings.max_response_bytes)
        return Embedded(arrays, tokens)

    async def _compute(
        self, model: str, modality: str, inputs: list[dict[str, Any]], gone: Gone | None, options: dict[str, Any]
    ) -> Embedded:
        await self.check_capacity(model, modality)
        self._sent[(model, modality)] += len(inputs)
        queue = embed_queue(model, modality)
        spec = self._registry.specs.get(model)
        if not self._settings.coalesce or spec is None or len(inputs) >= spec.max_batch_size:
            kwargs = embed_kwargs(model, modality, inputs, **options)
            return Embedded.from_result(await self._call(EMBED_TASK, queue, kwargs, gone))

        async def run(batch: Inputs, batch_gone: Gone | None, timeout: float, sent: Callable[[], None]) -> Embedded:
            kwargs = embed_kwargs(model, modality, batch, **options)
            return Embedded.from_result(await self._send_and_wait(EMBED_TASK, queue, kwargs, batch_gone, timeout, sent))

        with self._admitted():
            lane = (model, modality, *sorted(options.items()))
            timeout = self._settings.request_timeout_s
            return await self.coalescer.submit(lane, spec.max_batch_size, inputs, gone, timeout, run)

    async def tokenize(
        self,
        model: str,
        texts: list[str],
        gone: Gone | None,
        input_type: str = "document",
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """Each text's tokens by the model's own tokenizer, on a worker of its text queue (the API
        holds no tokenizer): the texts as tokenized (`texts`, with any query prefix) and their
        `tokens`, `[id, text, special, start, stop]` each."""
        await self.check_capacity(model, "text")
        kwargs = tokenize_kwargs(model, texts, input_type, add_special_tokens)
        return await self._call(TOKENIZE_TASK, embed_queue(model, "text"), kwargs, gone)

    async def _live_searchers(self) -> set[str]:
        members = await live_workers(self._client, keys.SEARCH_WORKERS_ALIVE, self._settings.worker_heartbeat_ttl_s)
        return {member.decode() for member in members}

    async def search_pages(
        self,
        collection: str,
        query: np.ndarray,
        top_k: int,
        filter: str | None,
        gone: Gone | None = None,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The `top_k` pages of a late-interaction collection by exact MaxSim: one search per live
        search worker, each over the shards it owns (common.shards), merged. A worker that stops
        mid-search makes it a 503 naming its shards, never an answer from the others alone."""
        shards = self._settings.search_shards
        by_worker = plan(shards, await self._live_searchers())
        if not by_worker:
            raise ServiceUnavailable("No worker is serving page search right now; try again later.")
        calls = {
            worker: asyncio.ensure_future(
                self._call(
                    SEARCH_TASK,
                    search_queue(worker),
                    search_kwargs(collection, query, top_k, filter, owned, worker, tenant),
                    gone,
                )
            )
            for worker, owned in by_worker.items()
        }
        try:
            while not all(call.done() for call in calls.values()):
                await asyncio.wait(calls.values(), timeout=SEARCHER_CHECK_S, return_when=asyncio.FIRST_EXCEPTION)
                if any(call.done() and call.exception() for call in calls.values()):
                    break
                stopped = {w for w, call in calls.items() if not call.done()} - await self._live_searchers()
                if stopped:  # its own queue goes with it (workers.start, _forget_stopped_searchers)
                    missing = sorted(shard for w in stopped for shard in by_worker[w])
                    raise ServiceUnavailable(
                        f"The search worker holding shards {missing} of {shards} stopped during this search; "
                        "try again (another worker takes them over)."
                    )
            hits = [hit for call in calls.values() for hit in call.result()]
        finally:
            for call in calls.values():
                call.cancel()
        return sorted(hits, key=lambda hit: -hit["score"])[:top_k]
