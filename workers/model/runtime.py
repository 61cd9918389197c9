"""What a model worker holds once it has started: its model (a backend) and its batcher.

A worker serves one model on one device; `load_runtime` loads and warms the model before the
worker consumes anything. Its heartbeat (workers.start) tells the API the worker is live and warm
while the batcher runs, and publishes the batcher's counters with each beat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

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
    published: dict[str, int] = field(default_factory=dict)  # inputs embedded, as last added to keys.ITEMS

    def publish_stats(self, client: redis.Redis, worker: str, ttl_s: float) -> None:
        """The batcher's counters, with this worker's model and device, in its `worker_stats` hash,
        and the inputs it embedded since the last call added to the service's totals."""
        key = keys.worker_stats(worker)
        embedded = dict(self.batcher.embedded)
        with client.pipeline() as pipe:
            pipe.hset(key, mapping={"model": self.spec.name, "device": self.device, **asdict(self.batcher.stats)})
            pipe.expire(key, ttl_s)
            for modality, count in embedded.items():
                if count > self.published.get(modality, 0):
                    field_name = f"embedded:{self.spec.name}:{modality}"
                    pipe.hincrby(keys.ITEMS, field_name, count - self.published.get(modality, 0))
            pipe.execute()
        self.published = embedded


def load_runtime(spec: ModelSpec, device: str, modalities: list[str], settings: Settings) -> Runtime:
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
    )
    batcher.start()
    return Runtime(spec, backend, batcher, modalities, str(getattr(backend, "device", device)))
