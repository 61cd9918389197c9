"""What a model worker holds once it has started: its model (a backend) and its batcher.

A worker serves one model on one device; `load_runtime` loads and warms the model before the
worker consumes anything. Its heartbeat (workers.start) tells the API the worker is live and warm
while the batcher runs, and publishes the batcher's counters with each beat. The inputs it computes
are added to the service's totals (keys.ITEMS) batch by batch, so that a worker killed loses none
of the count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import redis
import torch
from celery.worker import state

from common import keys
from common.registry import ModelSpec
from common.settings import Settings

from ..backends import create_backend
from ..backends.base import Backend
from .batcher import Batcher

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    spec: ModelSpec
    backend: Backend
    batcher: Batcher
    modalities: list[str]
    device: str

    def publish_stats(self, client: redis.Redis, worker: str, ttl_s: float) -> None:
        """The batcher's counters, with this worker's model and device, in its `worker_stats` hash."""
        key = keys.worker_stats(worker)
        with client.pipeline() as pipe:
            pipe.hset(key, mapping={"model": self.spec.name, "device": self.device, **asdict(self.batcher.stats)})
            pipe.expire(key, ttl_s)
            pipe.execute()


class EmbeddedCount:
    """Adds each batch's inputs to the service's totals; what Redis did not take (it was away)
    goes with the next batch."""

    def __init__(self, client: redis.Redis, model: str):
        self._client, self._model = client, model
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, modality: str, n: int) -> None:
        with self._lock:
            self._pending[modality] += n
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for name, count in self._pending.items():
                        pipe.hincrby(keys.ITEMS, f"embedded:{self._model}:{name}", count)
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("counting %d embedded inputs failed (%s); adding them with the next batch", n, exc)
                return
            self._pending.clear()


def load_runtime(
    spec: ModelSpec, device: str, modalities: list[str], settings: Settings, client: redis.Redis
) -> Runtime:
    torch.set_num_threads(settings.cpu_threads)
    backend = create_backend(spec, device, settings)
    started = time.perf_counter()
    backend.load()
    backend.warmup()
    log.info("model %s loaded and warmed on %s in %.1fs", spec.name, device, time.perf_counter() - started)
    # A task revoked by its sender (a caller that has gone) is dropped by the batcher, not computed.
    batcher = Batcher(
        backend.embed,
        spec.batch_token_budget,
        spec.max_batch_size,
        ("text", "image"),
        dropped=lambda tag: tag in state.revoked,
        counted=EmbeddedCount(client, spec.name),
    )
    batcher.start()
    return Runtime(spec, backend, batcher, modalities, str(getattr(backend, "device", device)))
