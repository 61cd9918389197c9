"""The embedding cache's clients: the API's (asyncio) and the model workers' (blocking).

Both do the same three things: look a request's inputs up with one MGET, write what was computed
with one pipeline of `SET ... EX` (EMBEDQ_CACHE_TTL_S), and count hits and misses. A cache that
fails (unreachable, slower than EMBEDQ_CACHE_TIMEOUT_S, or holding what is not an entry) fails no
request: the error is counted, its inputs are computed as misses, and the cache is left alone for
RETRY_S, so that a cache that is down costs one timeout every RETRY_S, not one per request. The
clients' sockets time out after EMBEDQ_CACHE_TIMEOUT_S (common.connections); the API's calls are
bounded by it as a whole too, connecting included.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from ..keys import CACHE_COUNTS
from ..registry import ModelSpec
from .entries import Keys, Lookup

log = logging.getLogger(__name__)

RETRY_S = 2.0
# What a failing cache raises: redis-py's errors (timeouts included), and a value that is not an entry.
FAILURES = (redis.RedisError, OSError, ValueError, struct.error)


class _Cache:
    """What both clients share: the lookup's bookkeeping, the counts and the pause after an error."""

    def __init__(self, ttl_s: int, path: str):
        self.ttl_s = ttl_s
        self.path = path  # `online` or `ingest`: the counts' label (common.keys.CACHE_COUNTS)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # a worker's tasks run in threads
        self._resume_at = 0.0

    def take_counts(self) -> Counter[str]:
        """The counts since the last take, as fields of common.keys.CACHE_COUNTS."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts

    def _count(self, what: str, lookup: Lookup, n: int) -> None:
        if n:
            with self._lock:
                self._counts[f"{what}:{self.path}:{lookup.model}:{lookup.modality}"] += n

    def _usable(self) -> bool:
        return time.monotonic() >= self._resume_at

    def _failed(self, lookup: Lookup, exc: Exception) -> None:
        log.warning("the embedding cache failed (%r); leaving it alone for %gs", exc, RETRY_S)
        self._count("errors", lookup, 1)
        self._resume_at = time.monotonic() + RETRY_S

    def _looked_up(self, lookup: Lookup) -> Lookup:
        missing = len(lookup.missing)
        self._count("hits", lookup, len(lookup.keys) - missing)
        self._count("misses", lookup, missing)
        return lookup


class AsyncCache(_Cache):
    def __init__(self, client: aioredis.Redis, ttl_s: int, timeout_s: float, path: str = "online"):
        super().__init__(ttl_s, path)
        self.client = client
        self.timeout_s = timeout_s

    async def lookup(self, spec: ModelSpec, modality: str, inputs: list[dict[str, Any]], options: dict) -> Lookup:
        lookup = Lookup(Keys(spec, modality, options), inputs, spec.name, modality)
        if self._usable():
            try:
                lookup.take(await asyncio.wait_for(self.client.mget(lookup.keys), self.timeout_s))
            except (*FAILURES, asyncio.TimeoutError) as exc:
                self._failed(lookup, exc)
        return self._looked_up(lookup)

    async def store(self, lookup: Lookup, arrays: list[np.ndarray], tokens: list[int]) -> None:
        """Write the computed arrays of `lookup`'s missing inputs (in `missing`'s order)."""
        if not self._usable():
            return
        try:
            await asyncio.wait_for(self._write(lookup.entries(arrays, tokens)), self.timeout_s)
        except (*FAILURES, asyncio.TimeoutError) as exc:
            self._failed(lookup, exc)

    async def stats(self) -> dict[str, int] | None:
        """The cache Redis's own numbers, for `/metrics`: memory used and its bound, entries, and
        entries evicted to stay within it; None when it cannot be read in time."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.info("memory").info("stats").dbsize()
                memory, stats, entries = await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except (*FAILURES, asyncio.TimeoutError):
            return None
        return {
            "bytes": int(memory["used_memory"]),
            "max_bytes": int(memory["maxmemory"]),
            "entries": int(entries),
            "evictions": int(stats["evicted_keys"]),
        }

    async def _write(self, entries: dict[str, bytes]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value in entries.items():
                pipe.set(key, value, ex=self.ttl_s)
            await pipe.execute()


class SyncCache(_Cache):
    def __init__(self, client: redis.Redis, ttl_s: int, path: str = "ingest"):
        super().__init__(ttl_s, path)
        self.client = client

    def lookup(self, spec: ModelSpec, modality: str, inputs: list[dict[str, Any]], options: dict) -> Lookup:
        lookup = Lookup(Keys(spec, modality, options), inputs, spec.name, modality)
        if self._usable():
            try:
                lookup.take(self.client.mget(lookup.keys))
            except FAILURES as exc:
                self._failed(lookup, exc)
        return self._looked_up(lookup)

    def store(self, lookup: Lookup, arrays: list[np.ndarray], tokens: list[int]) -> None:
        """Write the computed arrays of `lookup`'s missing inputs (in `missing`'s order)."""
        if not self._usable():
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in lookup.entries(arrays, tokens).items():
                    pipe.set(key, value, ex=self.ttl_s)
                pipe.execute()
        except FAILURES as exc:
            self._failed(lookup, exc)


def add_counts(pipe: redis.client.Pipeline | aioredis.client.Pipeline, counts: Counter[str]) -> None:
    """Queue on a pipeline of the main Redis the adding of `counts` to the service's totals."""
    for field, n in counts.items():
        pipe.hincrby(CACHE_COUNTS, field, n)
