"""A worker SIGKILLed while it holds requests, or while it takes one off the queue: another worker
runs them, nothing is lost, and every request gets exactly its own answer."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from common.contract import embed_queue
from common.delivery.lost import UNACKED_KEY, queue_lists
from common.launch import procs

from .stack import start_api, start_worker

MODEL = "minilm-loss"
REQUESTS = 40
TEXTS_PER_REQUEST = 32


@pytest.fixture
def loss_env(stack_env, models_file, tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text(models_file.read_text().replace("all-MiniLM-L6-v2", MODEL))
    # A worker holds at most 8 requests (a few seconds of work even on a loaded CI machine), well
    # under the visibility timeout, so only the killed worker's tasks are redelivered.
    return {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_REQUEST_TIMEOUT_S": "90",
        "EMBEDQ_WORKER_CONCURRENCY": "8",
    }


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing(loss_env, logs, reference_minilm):
    client = redis.Redis.from_url(loss_env["EMBEDQ_REDIS_URL"])
    first = start_worker(loss_env, MODEL, logs / "worker-loss-a.log")
    api, base = start_api(loss_env, logs / "api-loss.log")
    second = None
    try:
        batches = [
            [f"request {r} sentence {i} about queues" for i in range(TEXTS_PER_REQUEST)] for r in range(REQUESTS)
        ]
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [
                pool.submit(httpx.post, f"{base}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=120)
                for texts in batches
            ]
            deadline = time.monotonic() + 30
            # The first worker holds some: two requests a task (api.coalesce), a full batch each, of
            # which a worker fetches EMBEDQ_FETCH_BATCHES (2) at a time.
            while client.hlen("unacked") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            held = client.hlen("unacked")
            assert held > 0, "the killed worker held no request; the test proves nothing"
            second = start_worker(loss_env, MODEL, logs / "worker-loss-b.log")
            responses = [f.result(timeout=120) for f in futures]
        for texts, response in zip(batches, responses):
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert [d["index"] for d in data] == list(range(TEXTS_PER_REQUEST))
            ours = np.array([d["embedding"] for d in data])
            reference = reference_minilm.encode(texts)
            assert ((ours * reference).sum(1)).min() >= 0.9999  # each answer is its own request's
        assert client.hlen("unacked") == 0
    finally:
        procs.stop([p for p in (first, second, api) if p is not None])


@pytest.mark.slow
def test_a_request_lost_with_a_worker_taking_it_is_sent_again(loss_env, logs, reference_minilm):
    # The stopped worker's last heartbeat holds for 5 s: the API takes the request meanwhile, and
    # the next worker's heartbeat then finds it dead.
    env = {**loss_env, "EMBEDQ_LOST_TASK_CHECK_S": "1", "EMBEDQ_WORKER_HEARTBEAT_TTL_S": "5"}
    client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
    lists = queue_lists(embed_queue(MODEL, "text"))
    first = start_worker(env, MODEL, logs / "worker-lost-a.log")
    api, base = start_api(env, logs / "api-lost.log")
    second = None
    try:
        first.send_signal(signal.SIGSTOP)
        text = "a request whose message the broker loses"
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(httpx.post, f"{base}/v1/embeddings", json={"model": MODEL, "input": text}, timeout=120)
            # The stopped worker's pending BRPOP takes the message off the queue, and it never
            # records it as held; if that BRPOP was not pending, take the message off the same way.
            deadline = time.monotonic() + 10
            while not any(client.llen(key) for key in lists) and time.monotonic() < deadline:
                time.sleep(0.01)
            for key in lists:
                client.rpop(key)
            assert not any(client.llen(key) for key in lists)
            assert not any(MODEL.encode() in message for message in client.hvals(UNACKED_KEY))
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = start_worker(env, MODEL, logs / "worker-lost-b.log")
            response = future.result(timeout=120)
        assert response.status_code == 200, response.text
        ours = np.array(response.json()["data"][0]["embedding"])
        assert float(ours @ reference_minilm.encode(text)) >= 0.9999
        metrics = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
        resent = next(line for line in metrics if line.startswith("embedq_tasks_resent_total "))
        assert float(resent.split()[1]) >= 1  # more if the stopped worker's BRPOP took it again
    finally:
        procs.stop([p for p in (first, second, api) if p is not None])
