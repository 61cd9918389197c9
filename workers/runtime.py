"""What a worker process holds once it has started: its model, its batcher, its heartbeat.

A worker serves one model on one device; `start_runtime` loads and warms the model before the
worker consumes anything, and the heartbeat tells the API this worker is live and warm.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

import redis
import torch

from common import heartbeat, keys
from common.registry import ModelSpec
from common.settings import Settings

from .backends import create_backend
from .backends.base import Backend
from .batcher import Batcher

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    spec: ModelSpec
    backend: Backend
    batcher: Batcher
    modalities: list[str]
    name: str
    device: str


_runtime: Runtime | None = None


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("this process has no model loaded (not started through `embedq worker`)")
    return _runtime


def start_runtime(spec: ModelSpec, device: str, modalities: list[str], settings: Settings) -> Runtime:
    global _runtime
    torch.set_num_threads(settings.cpu_threads)
    backend = create_backend(spec, device)
    started = time.perf_counter()
    backend.load()
    backend.warmup()
    log.info("model %s loaded and warmed on %s in %.1fs", spec.name, device, time.perf_counter() - started)
    batcher = Batcher(backend.embed, spec.batch_token_budget, spec.max_batch_size, ("text", "image"))
    batcher.start()
    name = f"{spec.name}@{socket.gethostname()}:{os.getpid()}"
    _runtime = Runtime(spec, backend, batcher, modalities, name, str(getattr(backend, "device", device)))
    return _runtime


def start_heartbeat(runtime: Runtime, settings: Settings) -> threading.Thread:
    """Every few seconds, mark this worker live for its model and modalities while its batcher
    runs, with its batcher counters."""
    client = redis.Redis.from_url(settings.redis_url)
    stats_key = keys.worker_stats(runtime.name)

    def publish_stats() -> None:
        with client.pipeline() as pipe:
            pipe.hset(stats_key, mapping={"model": runtime.spec.name, "device": runtime.device,
                                          **asdict(runtime.batcher.stats)})
            pipe.expire(stats_key, settings.worker_heartbeat_ttl_s)
            pipe.execute()

    sets = [keys.workers_alive(runtime.spec.name, modality) for modality in runtime.modalities]
    return heartbeat.start_heartbeat(client, sets, runtime.name, settings.worker_heartbeat_ttl_s,
                                     alive=lambda: runtime.batcher.alive, extra=publish_stats)
