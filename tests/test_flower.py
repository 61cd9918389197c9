"""Flower, started as `embedq flower` starts it, sees the live MiniLM worker and its queue over its HTTP API."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from common.contract import embed_queue
from common.launch import procs
from common.launch.flower import is_loopback

from .conftest import MINILM, ROOT


@pytest.fixture
def flower_url(stack_env, minilm_worker, logs):
    port = procs.free_port()
    with open(logs / "flower.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from common.launch.flower import run_flower; run_flower(port={port})"],
            env=stack_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        procs.wait_for_port(port, 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop([proc])


def poll(url: str, found, timeout: float = 20):
    """GET `url` until `found(json)` is truthy; Flower learns of workers a few seconds after it starts."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, timeout=5)
        response.raise_for_status()
        hit = found(response.json())
        if hit or time.monotonic() > deadline:
            return hit
        time.sleep(0.5)


def test_flower_shows_worker_and_queue(flower_url, minilm_worker):
    queue = embed_queue(MINILM, "text")

    def our_worker(workers: dict) -> dict | None:
        return next((info for name, info in workers.items() if name.endswith(f":{minilm_worker.pid}")), None)

    worker = poll(f"{flower_url}/api/workers?refresh=1", our_worker)
    assert worker, "Flower did not list the MiniLM worker"
    assert queue in [q["name"] for q in worker["active_queues"]]

    def by_name(body: dict) -> dict | None:
        lengths = {q["name"]: q["messages"] for q in body["active_queues"]}
        return lengths if queue in lengths else None

    lengths = poll(f"{flower_url}/api/queues/length", by_name)
    assert lengths, "Flower did not report the queue length"
    assert lengths[queue] == 0


def test_loopback_only():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.1.2.3")
