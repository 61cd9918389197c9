"""Page search sharded over the live search workers.

A page's shard is a stable hash of its key, so every process agrees on it without asking. Each
shard is owned by one live search worker, chosen by rendezvous hashing (the worker with the highest
hash of the pair): every process that sees the same live workers makes the same plan, and a worker
joining or leaving moves only the shards it takes or gives up.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable


def shard_of(key: str, shards: int) -> int:
    """The shard of the page stored under `key` (`doc_id#page`)."""
    return zlib.crc32(key.encode()) % shards


def _weight(shard: int, worker: str) -> bytes:
    return hashlib.blake2b(f"{shard}/{worker}".encode(), digest_size=8).digest()


def owners(shards: int, workers: Iterable[str]) -> dict[int, str]:
    """Shard -> the worker of `workers` that owns it (empty when there are none)."""
    workers = sorted(set(workers))
    if not workers:
        return {}
    return {shard: max(workers, key=lambda worker: _weight(shard, worker)) for shard in range(shards)}


def plan(shards: int, workers: Iterable[str]) -> dict[str, list[int]]:
    """Worker -> the shards it owns, for the workers that own any."""
    by_worker: dict[str, list[int]] = {}
    for shard, worker in owners(shards, workers).items():
        by_worker.setdefault(worker, []).append(shard)
    return by_worker
