"""Page search sharded over the live search workers.

A page's shard is a stable hash of its key, so every process agrees on it without asking. Each shard is
owned by one live search worker, chosen by rendezvous hashing with bounded loads: shard by shard, in an
order of their own hashes, the worker with the highest hash of the pair among those holding fewer than
ceil(shards / workers). Every process that sees the same live workers makes the same plan, a worker
joining or leaving moves few shards (1.6 of 4 on average, against 1.3 unbounded), and no worker holds
more than its share (plain rendezvous hashing gives all 4 shards to one of 2 workers one time in 8).
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
    share = -(-shards // len(workers))
    held = dict.fromkeys(workers, 0)
    owned = {}
    for shard in sorted(range(shards), key=lambda shard: _weight(shard, "")):
        worker = max((w for w in workers if held[w] < share), key=lambda w: _weight(shard, w))
        owned[shard], held[worker] = worker, held[worker] + 1
    return owned


def plan(shards: int, workers: Iterable[str]) -> dict[str, list[int]]:
    """Worker -> the shards it owns, for the workers that own any."""
    by_worker: dict[str, list[int]] = {}
    for shard, worker in owners(shards, workers).items():
        by_worker.setdefault(worker, []).append(shard)
    return by_worker
