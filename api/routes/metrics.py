"""`GET /metrics` in Prometheus' text format (behind a key when keys are set: Prometheus sends one).

HTTP counters come from this app's `RequestMetrics` middleware; queue depths, live workers and each
live worker's batcher counters (its `worker_stats` hash) are read from Redis at scrape time, so the
numbers are Redis' own and nothing is kept between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis import RedisError

from common import keys
from common.contract import embed_queue
from common.delivery.heartbeat import live_workers
from common.registry import Registry
from common.settings import Settings

from .. import upstreams
from ..coalesce import Coalescer
from ..deps import RedisDep, RegistryDep, SettingsDep
from ..metrics import HttpStats

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])

# The batcher counters a worker's heartbeat writes into its worker_stats hash.
WORKER_COUNTERS = {
    "batches": "Batches the worker's batcher ran.",
    "items": "Inputs embedded in those batches.",
    "oom_splits": "Batches split in two after a device out-of-memory error.",
    "failed_batches": "Batches that failed, their error sent to every request in them.",
    "dropped": "Inputs not computed because their caller had gone or their deadline had passed.",
}


# The service's totals of inputs (online inputs, pages, chunks) in keys.ITEMS: in normal running
# embedded equals sent; a task run twice shows as more embedded than sent.
ITEM_COUNTERS = {
    "sent": "Inputs, pages and chunks sent to a model's queues by the API and the ingestion workers.",
    "embedded": "Inputs, pages and chunks the model workers computed.",
}


# The embedding cache's lookups in keys.CACHE_COUNTS, `<what>:<path>:<model>:<modality>`.
CACHE_COUNTERS = {
    "hits": "Inputs the embedding cache answered (path: online requests, or ingest pages and chunks).",
    "misses": "Inputs looked up in the embedding cache and computed.",
    "errors": "Lookups and writes that failed because the cache was unreachable or too slow.",
}
# The cache Redis's own numbers (common.cache.client.AsyncCache.stats).
CACHE_GAUGES = {
    "bytes": ("gauge", "Memory the embedding cache's Redis uses."),
    "max_bytes": ("gauge", "The embedding cache's memory bound (its Redis' maxmemory; 0: none)."),
    "entries": ("gauge", "Entries in the embedding cache."),
    "evictions": ("counter", "Entries the embedding cache's Redis evicted to stay within its bound."),
}


def cache_counters(counts: dict[str, int]) -> Iterator[Metric]:
    for what, help_text in CACHE_COUNTERS.items():
        counter = CounterMetricFamily(f"embedq_cache_{what}", help_text, labels=["path", "model", "modality"])
        for key, count in sorted(counts.items()):
            kind, path, rest = key.split(":", 2)
            if kind == what:
                model, _, modality = rest.rpartition(":")
                counter.add_metric([path, model, modality], count)
        yield counter


def cache_gauges(stats: dict[str, int] | None) -> Iterator[Metric]:
    """The cache Redis's numbers, or `embedq_cache_up 0` alone (the cache is off or unreadable)."""
    yield GaugeMetricFamily("embedq_cache_up", "1 when this scrape could read the embedding cache.", int(bool(stats)))
    for name, (kind, help_text) in CACHE_GAUGES.items():
        if stats:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"embedq_cache_{name}", help_text, value=stats[name])


@dataclass
class RedisReading:
    """What one scrape read from Redis."""

    queue_depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, modality) -> LLEN
    workers_alive: dict[tuple[str, str], int] = field(default_factory=dict)
    worker_stats: dict[str, dict[str, str]] = field(default_factory=dict)  # worker name -> its hash
    items: dict[str, int] = field(default_factory=dict)  # keys.ITEMS: `sent|embedded:<model>:<modality>` -> count
    search_stats: dict[str, dict[str, str]] = field(default_factory=dict)  # search worker -> its hash
    cache_counts: dict[str, int] = field(default_factory=dict)  # keys.CACHE_COUNTS

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "embedq_queue_depth", "Tasks waiting in a model's queue.", labels=["model", "modality", "queue"]
        )
        for (model, modality), count in self.queue_depth.items():
            depth.add_metric([model, modality, embed_queue(model, modality)], count)
        yield depth
        alive = GaugeMetricFamily(
            "embedq_workers_alive", "Warm workers with a recent heartbeat.", labels=["model", "modality"]
        )
        for labels, count in self.workers_alive.items():
            alive.add_metric(labels, count)
        yield alive
        for name, help_text in WORKER_COUNTERS.items():
            counter = CounterMetricFamily(f"embedq_worker_{name}", help_text, labels=["worker", "model", "device"])
            for worker, stats in self.worker_stats.items():
                counter.add_metric([worker, stats.get("model", ""), stats.get("device", "")], int(stats.get(name, 0)))
            yield counter
        for what, help_text in ITEM_COUNTERS.items():
            counter = CounterMetricFamily(f"embedq_items_{what}", help_text, labels=["model", "modality"])
            for key, count in sorted(self.items.items()):
                kind, rest = key.split(":", 1)
                if kind == what:
                    model, _, modality = rest.rpartition(":")
                    counter.add_metric([model, modality], count)
            yield counter
        kernel = GaugeMetricFamily(
            "embedq_search_kernel",
            "1 for the page scan kernel a live search worker timed fastest on its CPU.",
            labels=["worker", "kernel", "cpu"],
        )
        pages = GaugeMetricFamily("embedq_search_pages", "Pages a live search worker holds.", labels=["worker"])
        for worker, stats in self.search_stats.items():
            kernel.add_metric([worker, stats.get("kernel", ""), stats.get("cpu", "")], 1)
            pages.add_metric([worker], int(stats.get("pages", 0)))
        yield kernel
        yield pages
        yield from upstreams.families(self.worker_stats)
        yield from cache_counters(self.cache_counts)


async def read_redis(client: aioredis.Redis, registry: Registry, settings: Settings) -> RedisReading:
    served = [(spec.name, modality) for spec in registry for modality in spec.modalities]
    async with client.pipeline(transaction=False) as pipe:
        for model, modality in served:
            pipe.llen(embed_queue(model, modality))
            live_workers(pipe, keys.workers_alive(model, modality), settings.worker_heartbeat_ttl_s)
        live_workers(pipe, keys.SEARCH_WORKERS_ALIVE, settings.worker_heartbeat_ttl_s)
        live_workers(pipe, keys.BACKEND_STATS_WORKERS, settings.worker_heartbeat_ttl_s)
        *replies, searchers, fronting = await pipe.execute()
    depths, alive = replies[0::2], replies[1::2]
    searchers = sorted(member.decode() for member in searchers)
    # Live workers come from the heartbeat sets (and keys.BACKEND_STATS_WORKERS, for those fronting
    # upstreams, which leave the live sets while every upstream is down), not from a SCAN for stats
    # hashes: a SCAN walks the whole keyspace, about 0.5 s of Redis time per scrape with the million
    # task results that a busy API keeps.
    workers = sorted({member.decode() for members in [*alive, fronting] for member in members})
    async with client.pipeline(transaction=False) as pipe:
        for worker in workers + searchers:
            pipe.hgetall(keys.worker_stats(worker))
        pipe.hgetall(keys.ITEMS)
        pipe.hgetall(keys.CACHE_COUNTS)
        *hashes, items, cache_counts = await pipe.execute()
    decoded = [{k.decode(): v.decode() for k, v in raw.items()} for raw in hashes]
    return RedisReading(
        queue_depth=dict(zip(served, depths)),
        workers_alive={labels: len(members) for labels, members in zip(served, alive)},
        # A hash expires when its worker stops beating; one may go between the two round trips.
        worker_stats={worker: stats for worker, stats in zip(workers, decoded) if stats},
        items={k.decode(): int(v) for k, v in items.items()},
        search_stats={worker: stats for worker, stats in zip(searchers, decoded[len(workers) :]) if stats},
        cache_counts={k.decode(): int(v) for k, v in cache_counts.items()},
    )


class _Families:
    """The one thing `generate_latest` needs of a registry: `collect()`."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(
    http: HttpStats,
    reading: RedisReading | None,
    resent: int = 0,
    revoked: int = 0,
    cache: dict[str, int] | None = None,
    coalescer: Coalescer | None = None,
) -> bytes:
    """The exposition text: HTTP counters, then Redis' numbers, or `embedq_redis_up 0` without them,
    then the embedding cache's Redis's."""
    families = list(http.collect())
    families.append(
        CounterMetricFamily(
            "embedq_tasks_resent", "Online tasks sent again because the broker lost them (api.results).", value=resent
        )
    )
    families.append(
        CounterMetricFamily(
            "embedq_tasks_revoked",
            "Online tasks withdrawn because their caller went away (api.results).",
            value=revoked,
        )
    )
    if coalescer is not None:
        families.append(
            CounterMetricFamily(
                "embedq_coalesced_tasks",
                "Embedding tasks sent for requests that may share one (api.coalesce).",
                value=coalescer.tasks,
            )
        )
        families.append(
            CounterMetricFamily(
                "embedq_coalesced_requests",
                "The requests those tasks carried (api.coalesce).",
                value=coalescer.requests,
            )
        )
    if reading is not None:
        families += reading.collect()
    families.append(
        GaugeMetricFamily("embedq_redis_up", "1 when this scrape could read Redis.", value=int(reading is not None))
    )
    families += cache_gauges(cache)
    return generate_latest(_Families(families))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, client: RedisDep, registry: RegistryDep, settings: SettingsDep) -> Response:
    try:
        reading = await read_redis(client, registry, settings)
    except RedisError:
        # Still answer: the HTTP counters are worth having while Redis is down.
        log.warning("metrics: reading Redis failed", exc_info=True)
        reading = None
    waiter, cache = request.app.state.waiter, request.app.state.cache
    cache_stats = await cache.stats() if cache else None
    coalescer = request.app.state.dispatcher.coalescer
    body = render(request.app.state.http_stats, reading, waiter.resent, waiter.revoked, cache_stats, coalescer)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
