"""Start one worker: load and warm the model, then consume its queues with a Celery thread pool.

The thread pool lets many tasks wait at once while the batcher runs them together on the device;
its size bounds how many requests one worker holds (and so how big a greedy batch can get).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from celery import signals

from common import keys
from common.celery_app import get_celery_app
from common.heartbeat import start_heartbeat
from common.queues import INGEST_QUEUE, SEARCH_QUEUE, embed_queue
from common.registry import get_registry
from common.settings import get_settings

log = logging.getLogger(__name__)


def run_worker(model: str, device: str | None = None, modalities: list[str] | None = None) -> None:
    from . import runtime  # torch: only model workers pay for it

    settings = get_settings()
    spec = get_registry().get(model)
    modalities = modalities or spec.modalities
    unknown = set(modalities) - set(spec.modalities)
    if unknown:
        raise SystemExit(f"model {model} does not serve {sorted(unknown)}")
    # Ordered text first: the broker reads queues in this order (see celery_app).
    modalities = [m for m in ("text", "image") if m in modalities]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rt = runtime.start_runtime(spec, device or spec.device, modalities, settings)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        runtime.start_heartbeat(rt, settings)
        log.info("worker %s ready on queues %s", rt.name, [embed_queue(model, m) for m in modalities])

    from . import tasks  # noqa: F401  (registers the tasks on the app)

    get_celery_app().worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={','.join(embed_queue(model, m) for m in modalities)}",
            f"--hostname={rt.name}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )


def run_ingest_worker() -> None:
    """The CPU worker that renders PDFs and chunks text (no model; several processes)."""
    from .ingest import job_tasks  # also registers the ingestion task

    settings = get_settings()
    name = f"ingest@{socket.gethostname()}:{os.getpid()}"
    client = redis.Redis.from_url(settings.redis_url)
    start_heartbeat(client, [keys.INGEST_WORKERS_ALIVE], name, settings.worker_heartbeat_ttl_s)
    job_tasks().start_sweeper(settings.lost_task_check_s)
    get_celery_app().worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={settings.ingest_concurrency}",
            f"--queues={INGEST_QUEUE}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )


CATCH_UP_S = 1.0


def _follow_collections() -> None:
    from .search import searcher

    while True:
        time.sleep(CATCH_UP_S)
        try:
            searcher().catch_up()
        except Exception:  # Milvus or Redis away for a moment: searches say so; try again
            log.warning("catching up with the collections failed; retrying", exc_info=True)


def run_search_worker() -> None:
    """The worker that searches late-interaction collections from its in-memory copy of them. It
    loads them all before it says it is live; searches run one at a time, each on every core."""
    import torch

    from .search import searcher

    settings = get_settings()
    torch.set_num_threads(1)  # the searcher's own threads share the cores out (workers.page_index)
    name = f"search@{socket.gethostname()}:{os.getpid()}"
    searcher().preload()
    client = redis.Redis.from_url(settings.redis_url)
    start_heartbeat(client, [keys.SEARCH_WORKERS_ALIVE], name, settings.worker_heartbeat_ttl_s)
    threading.Thread(target=_follow_collections, name="embedq-catch-up", daemon=True).start()
    get_celery_app().worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={SEARCH_QUEUE}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )
