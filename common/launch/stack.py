"""`embedq up`: the whole local stack in the foreground, what `./scripts/run` starts.

Redis (EMBEDQ_REDIS_URL, or a private embedded redis-server keeping an append-only file under
./var/redis, fsynced every second, so a restart loses at most a second of writes), the embedding
cache's own Redis (EMBEDQ_CACHE_URL, or a private one in memory, bounded by EMBEDQ_CACHE_MAX_MB and
evicting the least recently used; none with EMBEDQ_CACHE=off), Milvus
(EMBEDQ_MILVUS_URI, or a Milvus Lite server with its data under ./var/), the API, one worker per
model in models.yaml, the CPU ingestion worker, the search worker, and Flower when asked. It waits
until the API says every one of them is live, and prints the URLs.

It supervises its children as a process manager does: a child that exits is logged and started
again (on the same port, for Redis and Milvus), after a backoff that doubles up to
MAX_BACKOFF_S and starts over once the child has stayed up STABLE_S. A child that keeps failing is
logged, and reported on `/health/ready` (through keys.STACK_CHILDREN).

Ctrl-C or SIGTERM stops the stack in dependency order: the API first, so no new work comes in;
then the workers, which finish what they hold (Celery's warm shutdown; the fetch gate keeps that
small), or, past WORKER_STOP_S, hand it back to the queue (cold shutdown); then Flower, Milvus and
Redis, which the workers needed until then. The children run in process groups of their own, so a
Ctrl-C in the terminal reaches only this process, which stops them in that order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .. import keys
from ..connections import redis_client
from ..registry import load_registry
from ..settings import Settings, get_settings
from . import procs
from .milvus_lite import MilvusLiteServer

READY_TIMEOUT_S = 600
API_STOP_S = 3.0
WORKER_STOP_S = 10.0  # then a cold shutdown: what a worker still holds goes back to its queue
WORKER_COLD_STOP_S = 3.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a child up this long has its backoff reset
FAILING_RESTARTS = 3  # restarts in a row (without a stable run) that make a child "failing"


@dataclass
class Child:
    """One supervised process: how to start it, and its restarts."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row, without a stable run
    backoff_s: float = FIRST_BACKOFF_S
    due_at: float | None = None  # when to start it again, after it exited
    last_exit: int | None = None

    def launch(self) -> None:
        self.started_at, self.due_at = time.monotonic(), None
        try:
            self.proc = self.start()
        except Exception as exc:  # e.g. Milvus Lite not listening in time: like an exit, try again later
            print(f"embedq: {self.name} did not start: {exc}", file=sys.stderr, flush=True)
            self.proc = None
            self.exited_with(-1)

    def exited_with(self, code: int) -> None:
        """Schedule the next start, after the backoff, which then doubles."""
        self.last_exit, self.restarts = code, self.restarts + 1
        self.due_at = time.monotonic() + self.backoff_s
        where = "; it keeps failing" if self.failing else ""
        print(
            f"embedq: {self.name} exited with {code}; starting it again in {self.backoff_s:g}s{where}",
            file=sys.stderr,
            flush=True,
        )
        self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)

    @property
    def failing(self) -> bool:
        return self.restarts >= FAILING_RESTARTS

    def status(self) -> dict:
        state = "running" if self.due_at is None else "restarting"
        return {"state": state, "restarts": self.restarts, "last_exit": self.last_exit, "failing": self.failing}


def _embedq(args: list[str], env: dict[str, str]) -> Callable[[], subprocess.Popen]:
    return lambda: procs.spawn([sys.executable, "-m", "common.launch.cli", *args], env=env)


def _ready(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _stop_workers(workers: list[subprocess.Popen]) -> None:
    """Warm shutdown, then cold shutdown (SIGQUIT: held tasks go back to their queues), then SIGKILL."""
    procs.signal_all(workers, signal.SIGTERM)
    if procs.wait_all(workers, WORKER_STOP_S):
        return
    procs.signal_all(workers, signal.SIGQUIT)
    if not procs.wait_all(workers, WORKER_COLD_STOP_S):
        procs.stop(workers, grace=0)


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: list[Child] = []
        self._redis: redis.Redis | None = None

    def add(self, name: str, start: Callable[[], subprocess.Popen]) -> Child:
        child = Child(name, start)
        child.launch()
        self.children.append(child)
        return child

    def tend(self) -> None:
        """Start again the children that exited, each after its backoff."""
        now = time.monotonic()
        for child in self.children:
            if child.due_at is not None:
                if now >= child.due_at:
                    print(f"embedq: starting {child.name} again", flush=True)
                    child.launch()
                continue
            code = child.proc.poll() if child.proc is not None else None
            if code is not None:
                child.exited_with(code)
            elif now - child.started_at > STABLE_S:
                child.restarts, child.backoff_s = 0, FIRST_BACKOFF_S

    def report(self) -> None:
        """The children's states, for `/health/ready`; best effort (Redis may be one of them)."""
        try:
            if self._redis is None:
                self._redis = redis_client(self.settings)
            states = {child.name: json.dumps(child.status()) for child in self.children}
            with self._redis.pipeline() as pipe:
                pipe.delete(keys.STACK_CHILDREN)
                pipe.hset(keys.STACK_CHILDREN, mapping=states)
                pipe.expire(keys.STACK_CHILDREN, 10)
                pipe.execute()
        except redis.RedisError:
            pass

    def procs(self, *names: str) -> list[subprocess.Popen]:
        return [c.proc for c in self.children if c.proc is not None and c.name.split(":")[0] in names]


def run_stack(flower: bool = False) -> int:
    settings = get_settings()
    env = dict(os.environ)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor = Supervisor(settings)
    milvus: MilvusLiteServer | None = None
    try:
        if not os.environ.get("EMBEDQ_REDIS_URL"):
            port, data = procs.free_port(), settings.var_dir / "redis"
            env["EMBEDQ_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            supervisor.add("redis", lambda: procs.start_redis(data, port))
            print(f"embedq: embedded Redis on {env['EMBEDQ_REDIS_URL']} (append-only file in {data})", flush=True)
        supervisor.settings = settings = settings.model_copy(update={"redis_url": env["EMBEDQ_REDIS_URL"]})
        if settings.cache and not settings.cache_url:
            cache_port, cache_mb = procs.free_port(), settings.cache_max_mb
            env["EMBEDQ_CACHE_URL"] = f"redis://127.0.0.1:{cache_port}/0"
            cache_dir = settings.var_dir / "cache"
            supervisor.add("cache", lambda: procs.start_cache_redis(cache_dir, cache_port, cache_mb))
            print(
                f"embedq: embedding cache Redis on {env['EMBEDQ_CACHE_URL']} "
                f"(in memory, at most {cache_mb} MiB, least recently used evicted)",
                flush=True,
            )
        if "EMBEDQ_MILVUS_URI" not in os.environ:
            milvus = MilvusLiteServer(settings.var_dir / "milvus", procs.free_port())
            env["EMBEDQ_MILVUS_URI"] = milvus.uri
            supervisor.add("milvus", lambda: milvus.start().proc)
            print(f"embedq: embedded Milvus Lite on {milvus.uri} (data in {milvus.data_dir})", flush=True)
        supervisor.add("api", _embedq(["api"], env))
        for spec in load_registry(settings.models_file):
            supervisor.add(f"worker:{spec.name}", _embedq(["worker", "--model", spec.name], env))
        supervisor.add("ingest-worker", _embedq(["ingest-worker"], env))
        supervisor.add("search-worker", _embedq(["search-worker"], env))
        if flower:
            supervisor.add("flower", _embedq(["flower"], env))
        base = f"http://{settings.host}:{settings.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced = False
        while not stopping:
            supervisor.tend()
            supervisor.report()
            if not announced:
                status = _ready(f"{base}/health/ready")
                if status and status.get("status") == "ready" and status["ingest_workers"] and status["search_workers"]:
                    print(f"embedq: ready. API {base}/v1  docs {base}/docs  health {base}/health/ready", flush=True)
                    if flower:
                        print("embedq: Flower http://127.0.0.1:5555", flush=True)
                    announced = True
                elif time.monotonic() > deadline:
                    print(f"embedq: not ready after {READY_TIMEOUT_S}s: {status}", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        print("embedq: stopping", flush=True)
        procs.stop(supervisor.procs("api"), grace=API_STOP_S)
        _stop_workers(supervisor.procs("worker", "ingest-worker", "search-worker"))
        procs.stop(supervisor.procs("flower"))
        if milvus is not None:
            milvus.stop()
        procs.stop(supervisor.procs("redis", "cache"))
        print("embedq: stopped", flush=True)
