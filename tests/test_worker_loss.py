"""A worker SIGKILLed while it holds requests: another worker runs them, nothing is lost, and every
request gets exactly its own answer once."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from common import procs

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
    return {**stack_env, "EMBEDQ_MODELS_FILE": str(config), "EMBEDQ_REQUEST_TIMEOUT_S": "90",
            "EMBEDQ_WORKER_CONCURRENCY": "8"}


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing(loss_env, logs, reference_minilm):
    client = redis.Redis.from_url(loss_env["EMBEDQ_REDIS_URL"])
    first = start_worker(loss_env, MODEL, logs / "worker-loss-a.log")
    api, base = start_api(loss_env, logs / "api-loss.log")
    second = None
    try:
        batches = [[f"request {r} sentence {i} about queues" for i in range(TEXTS_PER_REQUEST)] for r in range(REQUESTS)]
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [
                pool.submit(httpx.post, f"{base}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=120)
                for texts in batches
            ]
            deadline = time.monotonic() + 30
            while client.hlen("unacked") < 4 and time.monotonic() < deadline:  # the first worker holds some
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
