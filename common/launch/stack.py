"""`embedq up`: the whole local stack in the foreground, what `./scripts/run` starts.

Redis (EMBEDQ_REDIS_URL, or a private embedded redis-server with its files under ./var/), Milvus
(EMBEDQ_MILVUS_URI, or a Milvus Lite server with its data under ./var/), the API, one worker per
model in models.yaml, the CPU ingestion worker, the search worker, and Flower when asked. It waits
until the API says every one of them is live, and prints the URLs.

Ctrl-C or SIGTERM (or any child's death) stops the stack in dependency order: the API first, so no
new work comes in; then the workers, which finish what they hold (Celery's warm shutdown; the fetch
gate keeps that small), or, past WORKER_STOP_S, hand it back to the queue (cold shutdown); then
Flower, Milvus and Redis, which the workers needed until then. The children run in process groups
of their own, so a Ctrl-C in the terminal reaches only this process, which stops them in that order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from ..registry import load_registry
from ..settings import get_settings
from . import procs
from .milvus_lite import MilvusLiteServer

READY_TIMEOUT_S = 600
API_STOP_S = 3.0
WORKER_STOP_S = 10.0  # then a cold shutdown: what a worker still holds goes back to its queue
WORKER_COLD_STOP_S = 3.0


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return procs.spawn([sys.executable, "-m", "common.launch.cli", *args], env=env)


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


def run_stack(flower: bool = False) -> int:
    settings = get_settings()
    env = dict(os.environ)
    api: list[subprocess.Popen] = []
    workers: list[subprocess.Popen] = []
    tools: list[subprocess.Popen] = []
    redis_proc: subprocess.Popen | None = None
    milvus: MilvusLiteServer | None = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        env["EMBEDQ_REDIS_URL"], redis_proc = procs.redis_or_embedded(
            os.environ.get("EMBEDQ_REDIS_URL"), settings.var_dir / "redis"
        )
        if redis_proc:
            print(
                f"embedq: embedded Redis on {env['EMBEDQ_REDIS_URL']} (data in {settings.var_dir / 'redis'})",
                flush=True,
            )
        if "EMBEDQ_MILVUS_URI" not in os.environ:
            milvus = MilvusLiteServer(settings.var_dir / "milvus", procs.free_port()).start()
            env["EMBEDQ_MILVUS_URI"] = milvus.uri
            print(f"embedq: embedded Milvus Lite on {milvus.uri} (data in {milvus.data_dir})", flush=True)
        api.append(_spawn(["api"], env))
        for spec in load_registry(settings.models_file):
            workers.append(_spawn(["worker", "--model", spec.name], env))
        workers.append(_spawn(["ingest-worker"], env))
        workers.append(_spawn(["search-worker"], env))
        if flower:
            tools.append(_spawn(["flower"], env))
        base = f"http://{settings.host}:{settings.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced = False
        while not stopping:
            if any(child.poll() is not None for child in api + workers + tools):
                print("embedq: a child process exited; stopping the stack", file=sys.stderr, flush=True)
                return 1
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
        procs.stop(api, grace=API_STOP_S)
        _stop_workers(workers)
        procs.stop(tools)
        if milvus is not None:
            milvus.stop()
        if redis_proc is not None:
            procs.stop([redis_proc])
        print("embedq: stopped", flush=True)
