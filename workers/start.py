"""Starting a worker process: build its clients (workers.process), load what it serves, then
consume its queues, with a heartbeat from the moment Celery consumes until it starts stopping.

- A model worker loads and warms its model first, and runs a Celery thread pool: many tasks wait
  at once while the batcher runs them together on the device; the pool's size bounds how many
  requests one worker holds (and so how big a greedy batch can get).
- The ingestion worker renders and chunks in a prefork pool, and watches the open jobs
  (common.jobs.watch).
- The search worker loads every page collection first, searches one at a time (each search uses
  every core), and catches up with the collections' changes every second.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from celery import signals
from kombu.transport.redis import Channel
from redis import RedisError

from common import keys
from common.contract import INGEST_QUEUE, SEARCH_QUEUE, embed_queue, search_queue, task_items
from common.delivery.gate import FetchGate
from common.delivery.heartbeat import Heartbeat, live_workers
from common.delivery.lost import queue_lists
from common.jobs.watch import JobWatch
from common.registry import load_registry
from common.settings import get_settings
from common.shards import plan

from . import process

log = logging.getLogger(__name__)

CATCH_UP_S = 1.0
FORGET_SEARCHER_TTLS = 4


def _consume(
    proc: process.Process,
    queues: list[str],
    pool: str,
    concurrency: int,
    alive_sets: list[str],
    alive: Callable[[], bool] = lambda: True,
    extra: Callable[[], None] = lambda: None,
    serving: Callable[[], bool] = lambda: True,
) -> None:
    """Run the Celery worker on `queues` in the foreground. From the moment it consumes, it beats in
    `alive_sets` (while `serving()`) and renews the leases of the messages it holds
    (common.delivery.leases); the moment it starts stopping, it leaves the sets, so the API routes
    nothing more to it."""
    settings = proc.settings

    def beat_extra() -> None:
        proc.leases.renew(proc.redis)
        extra()

    heartbeat = Heartbeat(
        proc.redis,
        alive_sets,
        proc.name,
        settings.worker_heartbeat_ttl_s,
        settings.heartbeat_every_s,
        alive=alive,
        extra=beat_extra,
        serving=serving,
    )

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        heartbeat.start()
        log.info("worker %s ready on queues %s", proc.name, queues)

    @signals.worker_shutting_down.connect(weak=False)
    def _stopping(**_: object) -> None:
        heartbeat.stop()

    proc.celery.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={','.join(queues)}",
            f"--hostname={proc.name}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )


def model_worker(model: str, device: str | None = None, modalities: list[str] | None = None) -> None:
    from .model import tasks  # noqa: F401  (torch: only model workers pay for it; registers the tasks)
    from .model.runtime import load_runtime

    settings = get_settings()
    spec = load_registry(settings.models_file).get(model)
    modalities = modalities or spec.modalities
    unknown = set(modalities) - set(spec.modalities)
    if unknown:
        raise SystemExit(f"model {model} does not serve {sorted(unknown)}")
    # Ordered text first: the broker reads queues in this order (see delivery.app).
    modalities = [m for m in ("text", "image") if m in modalities]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = process.start(settings, spec.name)
    proc.runtime = runtime = load_runtime(spec, device or spec.device, modalities, settings, proc.redis)
    gate = FetchGate(settings.fetch_batches * spec.max_batch_size, task_items)
    gate.install(proc.celery)

    def beat_extra() -> None:
        gate.reconcile()
        runtime.publish_stats(proc.redis, proc.name, settings.worker_heartbeat_ttl_s)

    @signals.worker_shutdown.connect(weak=False)
    def _stopped(**_: object) -> None:
        runtime.close()  # after the tasks: a server the backend supervises stops with the worker

    _consume(
        proc,
        [embed_queue(model, m) for m in modalities],
        "threads",
        settings.worker_concurrency,
        [keys.workers_alive(spec.name, m) for m in modalities],
        alive=lambda: runtime.batcher.alive,
        extra=beat_extra,
        serving=runtime.available,
    )


def ingest_worker() -> None:
    """The CPU worker that renders PDFs and chunks text (no model; several processes)."""
    from common.inputs.office import clean_up_after_dead_workers

    from .ingest import tasks  # noqa: F401  (registers the ingestion task)

    settings = get_settings()
    clean_up_after_dead_workers()
    proc = process.start(settings, "ingest")
    JobWatch(proc.redis, proc.jobs, proc.ledger, settings.worker_heartbeat_ttl_s, settings.job_stall_timeout_s).start(
        settings.lost_task_check_s
    )
    _consume(proc, [INGEST_QUEUE], "prefork", settings.ingest_concurrency, [keys.INGEST_WORKERS_ALIVE])


def search_worker() -> None:
    """The worker that searches late-interaction collections from its in-memory copy of them. It
    loads them all before it says it is live; searches run one at a time, each on every core."""
    import torch

    from .search import tasks  # noqa: F401  (registers the search task)
    from .search.scan import Searcher

    settings = get_settings()
    torch.set_num_threads(1)  # the searcher's own threads share the cores out (workers.search.scan)
    proc = process.start(settings, "search")
    proc.searcher = Searcher(
        proc.store,
        proc.store.changes,
        settings.cpu_threads,
        settings.scan_kernel,
        settings.search_shards,
        int(settings.search_memory_gb * 2**30),
    )
    proc.searcher.owned = _owned_shards(proc)
    proc.searcher.preload()
    threading.Thread(target=_follow_collections, args=(proc,), name="embedq-catch-up", daemon=True).start()
    queues = [SEARCH_QUEUE, search_queue(proc.name)]
    _consume(proc, queues, "solo", 1, [keys.SEARCH_WORKERS_ALIVE], extra=lambda: _publish_search_stats(proc))


def _owned_shards(proc: process.Process) -> set[int]:
    """The shards this search worker owns among the live ones (itself counted, live or not yet)."""
    live = [
        name.decode()
        for name in live_workers(proc.redis, keys.SEARCH_WORKERS_ALIVE, proc.settings.worker_heartbeat_ttl_s)
    ]
    return set(plan(proc.settings.search_shards, [*live, proc.name]).get(proc.name, []))


def _publish_search_stats(proc: process.Process) -> None:
    """The scan kernel this search worker chose and the pages it holds, for `/metrics`."""
    import torch

    key = keys.worker_stats(proc.name)
    stats = {
        "kernel": proc.searcher.kernel.name,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "pages": sum(proc.searcher.held().values()),
    }
    with proc.redis.pipeline() as pipe:
        pipe.hset(key, mapping=stats)
        pipe.expire(key, proc.settings.worker_heartbeat_ttl_s)
        pipe.hset(keys.SEARCH_QUEUES, proc.name, time.time())
        pipe.execute()


def _forget_stopped_searchers(proc: process.Process) -> None:
    """Remove the own queues (and kombu's bindings of them) of search workers silent for
    FORGET_SEARCHER_TTLS heartbeat TTLs: each start of a search worker makes one."""
    quiet_since = time.time() - FORGET_SEARCHER_TTLS * proc.settings.worker_heartbeat_ttl_s
    for name, seen in proc.redis.hgetall(keys.SEARCH_QUEUES).items():
        if float(seen) < quiet_since:
            queue = search_queue(name.decode())
            bindings = [Channel.keyprefix_queue % queue, Channel.keyprefix_binding_permanent % queue]
            proc.redis.delete(*queue_lists(queue), *bindings)
            proc.redis.hdel(keys.SEARCH_QUEUES, name)
            log.info("removed the queue of %s, a search worker that stopped", name.decode())


def _follow_collections(proc: process.Process) -> None:
    """Every second: hold the shards owned here (workers joining or leaving move them), catch up
    with the collections, and say what was applied, so that the change feeds are trimmed once every
    live search worker has applied them."""
    from pymilvus import MilvusException

    ttl = proc.settings.worker_heartbeat_ttl_s
    while True:
        time.sleep(CATCH_UP_S)
        try:
            proc.searcher.rebalance(_owned_shards(proc))
            _forget_stopped_searchers(proc)
            live = [name.decode() for name in live_workers(proc.redis, keys.SEARCH_WORKERS_ALIVE, ttl)]
            for collection, entry_id in proc.searcher.applied().items():
                proc.searcher.changes.applied(collection, proc.name, entry_id, live)
        except (RedisError, MilvusException) as exc:  # away for a moment: searches say so; try again
            log.warning("catching up with the collections failed (%s); retrying", exc)
        except Exception:
            log.exception("catching up with the collections failed; retrying")
