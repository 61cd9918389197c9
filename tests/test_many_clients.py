"""Many clients at once on one API process: 2,000 open SSE streams, while online requests keep
answering; a real Redis, real worker processes, the real API.

The model is `tests.backends:timed` (a stand-in for GPU time, see its docstring), so the job's
length does not depend on this machine's CPUs.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis

from common.launch import procs

from . import stack
from .stack import spawn, start_api, start_worker

MODEL = "sse"
STREAMS = 2000


@pytest.fixture(scope="module")
def env(redis_server, milvus_uri, tmp_path_factory):
    url = f"{redis_server}/6"
    redis.Redis.from_url(url).flushdb()
    config = tmp_path_factory.mktemp("many") / "models.yaml"
    config.write_text(
        f"models:\n  - name: {MODEL}\n    backend: tests.backends:timed\n    path: none\n    device: cpu\n"
    )
    return stack.test_env(url, config, EMBEDQ_MILVUS_URI=milvus_uri, TEST_ITEM_S="0.02")


async def follow(client: httpx.AsyncClient, url: str) -> list[str]:
    """The event names of one SSE stream, until it ends."""
    names = []
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                names.append(line.partition(":")[2].strip())
    return names


@pytest.mark.slow
def test_two_thousand_streams_get_their_final_event_while_requests_keep_answering(env, logs):
    ingest = spawn(["ingest-worker"], env, logs / "many-ingest.log")
    api, base = start_api(env, logs / "many-api.log")
    worker = start_worker(env, MODEL, logs / "many-worker-a.log")
    workers = []
    try:
        httpx.post(f"{base}/v1/collections", json={"name": "many", "model": MODEL}, timeout=30).raise_for_status()
        procs.stop([worker])  # the job waits, so every stream opens before it ends
        text = " ".join(f"Sentence {i} of a text for many readers." for i in range(1500))
        response = httpx.post(
            f"{base}/v1/collections/many/documents", files=[("files", ("many.txt", text.encode(), "text/plain"))]
        )
        job_id = response.json()["id"]

        async def run() -> tuple[list, list[int]]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120, connect=60)) as client:
                streams = [
                    asyncio.create_task(follow(client, f"{base}/v1/jobs/{job_id}/events")) for _ in range(STREAMS)
                ]
                await asyncio.sleep(5)  # the streams connect
                workers.append(await asyncio.to_thread(start_worker, env, MODEL, logs / "many-worker-b.log"))
                statuses = []
                for i in range(20):  # online requests while every stream is open
                    body = {"model": MODEL, "input": f"online {i}"}
                    statuses.append((await client.post(f"{base}/v1/embeddings", json=body)).status_code)
                return await asyncio.gather(*streams, return_exceptions=True), statuses

        started = time.monotonic()
        streams, statuses = asyncio.run(run())
        took = time.monotonic() - started
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
    finally:
        procs.stop([api, ingest, *workers])
    errors = [s for s in streams if isinstance(s, BaseException)]
    assert not errors, f"{len(errors)} streams failed, e.g. {errors[0]!r}"
    assert all(names and names[-1] == "completed" for names in streams), json.dumps(streams[0])
    assert statuses == [200] * 20
    assert job["status"] == "completed" and job["processed"] == job["total"]
    assert took < 120
    log = (logs / "many-api.log").read_text()
    assert "Too many connections" not in log and "Traceback" not in log


def test_the_api_sheds_load_with_429_before_it_degrades(env, logs):
    """Past EMBEDQ_MAX_IN_FLIGHT requests waiting at once, the rest get 429 with Retry-After at once,
    and those taken are answered."""
    slow = {**env, "TEST_ITEM_S": "0.5", "EMBEDQ_MAX_IN_FLIGHT": "4"}
    worker = start_worker(slow, MODEL, logs / "shed-worker.log")
    api, base = start_api(slow, logs / "shed-api.log")
    try:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": MODEL, "input": "shed"}
                return await asyncio.gather(*(client.post(f"{base}/v1/embeddings", json=body) for _ in range(12)))

        started = time.monotonic()
        responses = asyncio.run(run())
        took = time.monotonic() - started
    finally:
        procs.stop([api, worker])
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 4 and codes.count(429) >= 4 and set(codes) <= {200, 429}, codes
    shed = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full" for r in shed)
    assert took < 30
