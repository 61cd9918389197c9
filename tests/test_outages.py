"""Surviving its infrastructure: a Redis with an append-only file that this test SIGKILLs and starts
again mid-job, and a Milvus Lite server it stops for 15 s mid-job, under a running API, ingestion
worker and model worker, none of which is restarted. Jobs complete with exact counts; while Redis
is down the API answers 503 (never 500) and `/health/live` within a second.

GPU time is stood in for by `tests.backends:timed` (see its docstring).
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from common.launch import procs
from common.launch.milvus_lite import MilvusLiteServer

from . import stack
from .stack import spawn, start_api, start_worker
from .test_ingestion import create_collection, make_pdf, upload, wait_job

MODEL = "steady"


class Parts:
    """This module's own Redis and Milvus, so that stopping them touches no other test."""

    def __init__(self, root):
        self.root = root
        self.redis_port = procs.free_port()
        self.redis = procs.start_redis(root / "redis", self.redis_port)
        self.milvus = MilvusLiteServer(root / "milvus", procs.free_port()).start()

    def kill_redis(self) -> None:
        self.redis.send_signal(signal.SIGKILL)
        self.redis.wait(timeout=10)

    def start_redis(self) -> None:
        self.redis = procs.start_redis(self.root / "redis", self.redis_port)

    def stop(self) -> None:
        procs.stop([self.redis])
        self.milvus.stop()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    parts = Parts(tmp_path_factory.mktemp("outages"))
    yield parts
    parts.stop()


@pytest.fixture(scope="module")
def env(parts):
    config = parts.root / "models.yaml"
    config.write_text(
        f"models:\n  - name: {MODEL}\n    backend: tests.backends:timed\n    path: none\n    late_interaction: true\n"
        "    device: cpu\n    modalities: [text, image]\n    max_batch_size: 4\n"
    )
    return stack.test_env(
        f"redis://127.0.0.1:{parts.redis_port}/0",
        config,
        EMBEDQ_MILVUS_URI=parts.milvus.uri,
        EMBEDQ_VISIBILITY_TIMEOUT_S="3",
        EMBEDQ_LOST_TASK_CHECK_S="1",
        EMBEDQ_INGEST_PAGES_PER_TASK="2",
        TEST_ITEM_S="0.2",
    )


@pytest.fixture(scope="module")
def api(env, logs):
    children = [
        start_worker(env, MODEL, logs / "outage-worker.log"),
        spawn(["ingest-worker"], env, logs / "outage-ingest.log"),
    ]
    proc, base = start_api(env, logs / "outage-api.log")
    yield base
    procs.stop([proc, *children])


def started_job(base: str, collection: str, pages: int, seed: int) -> dict:
    create_collection(base, collection, MODEL)
    job = upload(base, collection, [(f"{collection}.pdf", make_pdf(pages, seed=seed), "application/pdf")])
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["processed"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


@pytest.mark.slow
def test_a_redis_killed_and_started_again_mid_job_loses_nothing(api, parts, logs):
    pages = 30
    job = started_job(api, "redis_down", pages, seed=31)
    body = {"model": MODEL, "input": "in flight", "output": "pooled"}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{api}/v1/embeddings/text", json=body, timeout=60)
        parts.kill_redis()
        down = time.monotonic()
        statuses, live = [], []
        while time.monotonic() - down < 4:
            started = time.monotonic()
            live.append((httpx.get(f"{api}/health/live", timeout=5).status_code, time.monotonic() - started))
            statuses.append(httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=30).status_code)
            time.sleep(0.2)
        parts.start_redis()
        answered = in_flight.result().status_code
    final = wait_job(api, job["id"], timeout=120)
    assert set(statuses) == {503}, statuses  # never a 500, never a hang
    assert all(code == 200 and seconds < 1 for code, seconds in live), live
    assert answered in (200, 503)
    counts = (final["total"], final["processed"], final["failed"])
    assert final["status"] == "completed" and counts == (pages, pages, 0), str(final)
    assert httpx.get(f"{api}/v1/collections/redis_down").json()["count"] == pages
    deadline = time.monotonic() + 30
    while httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "online requests did not come back"
        time.sleep(0.5)
    for name in ("outage-worker.log", "outage-ingest.log"):
        assert "Unrecoverable error" not in (logs / name).read_text()


@pytest.mark.slow
def test_a_milvus_outage_mid_job_is_ridden_out(api, parts):
    pages = 20
    job = started_job(api, "milvus_down", pages, seed=32)
    parts.milvus.stop()
    time.sleep(15)
    parts.milvus.start()
    final = wait_job(api, job["id"], timeout=120)
    counts = (final["total"], final["processed"], final["failed"])
    assert final["status"] == "completed" and counts == (pages, pages, 0), str(final)
    assert httpx.get(f"{api}/v1/collections/milvus_down").json()["count"] == pages


def test_a_redis_restarted_on_a_large_append_only_file_answers_once_started(tmp_path):
    """Redis accepts connections while it replays its file but answers LOADING until done; whoever
    starts it (the local stack, the benchmarks) must get one that answers."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    port = procs.free_port()
    server = procs.start_redis(tmp_path, port)
    client = redis.Redis(port=port)
    try:
        value = b"x" * 1000
        for start in range(0, 200_000, 10_000):
            with client.pipeline(transaction=False) as pipe:
                for i in range(start, start + 10_000):
                    pipe.set(f"k{i}", value)
                pipe.execute()
        client.close()
        procs.stop([server])
        server = procs.start_redis(tmp_path, port)
        # no retries: redis-py's own (BusyLoadingError is a ConnectionError) would hide a short load
        once = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
        assert once.dbsize() == 200_000
        once.close()
    finally:
        client.close()
        procs.stop([server])
