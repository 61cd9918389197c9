"""`embedq up`: the whole local stack in the foreground, what `./scripts/run` starts.

Redis (EMBEDQ_REDIS_URL, or a private embedded redis-server with its files under ./var/), Milvus
(EMBEDQ_MILVUS_URI, or a Milvus Lite server with its data under ./var/), the API, one worker per
model in models.yaml, the CPU ingestion worker, the search worker, and Flower when asked. It waits
until the API says every one of them is live, prints the URLs, and on Ctrl-C / SIGTERM (or when
any child dies) stops every child it started.
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


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "common.launch.cli", *args], env=env)


def _ready(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def run_stack(flower: bool = False) -> int:
    settings = get_settings()
    env = dict(os.environ)
    children: list[subprocess.Popen] = []
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
            children.append(redis_proc)
            print(
                f"embedq: embedded Redis on {env['EMBEDQ_REDIS_URL']} (data in {settings.var_dir / 'redis'})",
                flush=True,
            )
        if "EMBEDQ_MILVUS_URI" not in os.environ:
            milvus = MilvusLiteServer(settings.var_dir / "milvus", procs.free_port()).start()
            env["EMBEDQ_MILVUS_URI"] = milvus.uri
            print(f"embedq: embedded Milvus Lite on {milvus.uri} (data in {milvus.data_dir})", flush=True)
        children.append(_spawn(["api"], env))
        for spec in load_registry(settings.models_file):
            children.append(_spawn(["worker", "--model", spec.name], env))
        children.append(_spawn(["ingest-worker"], env))
        children.append(_spawn(["search-worker"], env))
        if flower:
            children.append(_spawn(["flower"], env))
        base = f"http://{settings.host}:{settings.port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced = False
        while not stopping:
            if any(child.poll() is not None for child in children):
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
        procs.stop(list(reversed(children)))
        if milvus is not None:
            milvus.stop()
