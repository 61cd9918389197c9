"""What a model worker holds once it has started: its model (a backend) and its batcher.

A worker serves one model on one device; `load_runtime` loads and warms the model before the
worker consumes anything. Its heartbeat (workers.start) tells the API the worker is live and warm
while the batcher runs and the backend can compute, and publishes the batcher's counters with each
beat, with the backend's own stats when it has some (an upstream's replicas). The inputs it computes
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
        """The batcher's counters, with this worker's model and device and the backend's own stats,
        in its `worker_stats` hash; a backend with stats of its own also lists the worker in
        keys.BACKEND_STATS_WORKERS."""
        key = keys.worker_stats(worker)
        backend_stats = self.backend.stats() if hasattr(self.backend, "stats") else {}
        with client.pipeline() as pipe:
            stats = {
                "model": self.spec.name,
                "device": self.device,
                "dim": self.backend.dim,
                "dtype": self.dtype,
                **asdict(self.batcher.stats),
                **backend_stats,
            }
            pipe.hset(key, mapping=stats)
            pipe.expire(key, ttl_s)
            if backend_stats:
                now = time.time()
                pipe.zadd(keys.BACKEND_STATS_WORKERS, {worker: now})
                pipe.zremrangebyscore(keys.BACKEND_STATS_WORKERS, 0, now - ttl_s)
            pipe.execute()

    @property
    def dtype(self) -> str:
        """The float type the weights run in: a local model's resolved one, else the spec's."""
        dtype = getattr(self.backend, "options", {}).get("dtype")
        return str(dtype).removeprefix("torch.") if dtype is not None else self.spec.dtype

    def available(self) -> bool:
        """Whether the backend can compute now (one with no `available` always can)."""
        return self.backend.available() if hasattr(self.backend, "available") else True

    def close(self) -> None:
        """Stop the batcher, then release what the backend started."""
        self.batcher.stop()
        if hasattr(self.backend, "close"):
            self.backend.close()


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
        in_flight=getattr(backend, "passes_in_flight", 1),
    )
    batcher.start()
    return Runtime(spec, backend, batcher, modalities, str(getattr(backend, "device", device)))
