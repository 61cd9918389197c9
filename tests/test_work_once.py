"""Work is done once under real-sized work: a real Redis, real worker processes, the real API, the
ingestion worker and a Milvus Lite server, with a visibility timeout of 2 s that every job and
many held tasks outlast, as a large upload outlasts 30 s on a GPU.

GPU time is stood in for by `tests.backends` (a fixed time per input; see its docstring), and a
crashing kernel by its `poison` backend, which SIGKILLs its own process on a marked input.
"""

from __future__ import annotations

import io
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from common import keys
from common.launch import procs

from . import stack
from .backends import _vectors
from .stack import spawn, start_api, start_worker
from .test_ingestion import create_collection, make_pdf, sse_events, upload, wait_job

SLOW = "slow"  # 0.5 s per input
BUSY = "busy"  # 0.2 s per input, for online requests
POISON = "poison"
IDLE = "idle"  # its worker runs only to create a collection
VISIBILITY_S = 2
STALL_S = 8


@pytest.fixture(scope="module")
def env(redis_server, milvus_uri, tmp_path_factory):
    url = f"{redis_server}/7"  # a database of its own: restores and heartbeats are per database
    redis.Redis.from_url(url).flushdb()
    config = tmp_path_factory.mktemp("once") / "models.yaml"
    entry = """  - name: {name}
    backend: tests.backends:{backend}
    path: none
    late_interaction: true
    device: cpu
    modalities: [text, image]
    max_batch_size: 4
"""
    config.write_text(
        "models:\n"
        + entry.format(name=SLOW, backend="timed")
        + entry.format(name=BUSY, backend="timed")
        + entry.format(name=POISON, backend="poison")
        + entry.format(name=IDLE, backend="timed")
    )
    return stack.test_env(
        url,
        config,
        EMBEDQ_MILVUS_URI=milvus_uri,
        EMBEDQ_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        EMBEDQ_LOST_TASK_CHECK_S="1",
        EMBEDQ_INGEST_PAGES_PER_TASK="2",
        EMBEDQ_MAX_DELIVERIES="2",
        EMBEDQ_JOB_STALL_TIMEOUT_S=str(STALL_S),
        EMBEDQ_MAX_PAGES_PER_FILE="20",
    )


def worker(env: dict, model: str, log, item_s: float, *extra: str):
    return start_worker({**env, "TEST_ITEM_S": str(item_s)}, model, log, *extra)


@pytest.fixture(scope="module")
def api(env, logs):
    children = [spawn(["ingest-worker"], env, logs / "once-ingest.log")]
    proc, base = start_api(env, logs / "once-api.log")
    yield base
    procs.stop([proc, *children])


def items(base: str) -> dict[tuple[str, str, str], int]:
    """embedq_items_{sent,embedded}_total from /metrics: (what, model, modality) -> count."""
    found = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        match = re.match(r"embedq_items_(sent|embedded)_total\{(.*)\} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found[(match.group(1), labels["model"], labels["modality"])] = int(float(match.group(3)))
    return found


def settled_items(base: str, model: str, modality: str, expected: int, timeout: float = 10) -> tuple[int, int]:
    """(sent, embedded) once the workers' heartbeats have published what they embedded."""
    deadline = time.monotonic() + timeout
    while True:
        counts = items(base)
        sent, embedded = counts.get(("sent", model, modality), 0), counts.get(("embedded", model, modality), 0)
        if (sent >= expected and embedded >= sent) or time.monotonic() > deadline:
            time.sleep(1.5)  # a beat more: a duplicate run would show by now
            counts = items(base)
            return counts.get(("sent", model, modality), 0), counts.get(("embedded", model, modality), 0)
        time.sleep(0.2)


def png(color: tuple[int, int, int], corner: tuple[int, int, int] | None = None) -> bytes:
    image = Image.new("RGB", (64, 64), color)
    if corner:
        image.putpixel((0, 0), corner)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_a_job_longer_than_the_visibility_timeout_embeds_each_page_once(api, env, logs):
    slow = worker(env, SLOW, logs / "once-slow.log", 0.5)
    try:
        create_collection(api, "long", SLOW)
        pages = 16
        started = time.monotonic()
        job = upload(api, "long", [("long.pdf", make_pdf(pages, seed=21), "application/pdf")])
        final = wait_job(api, job["id"], timeout=120)
        took = time.monotonic() - started
        sent, embedded = settled_items(api, SLOW, "image", pages)
    finally:
        procs.stop([slow])
    # 8 s of model time at 0.5 s a page: each held batch waited longer than the visibility timeout.
    assert took > 3 * VISIBILITY_S
    assert final["status"] == "completed" and (final["total"], final["processed"], final["failed"]) == (pages, pages, 0)
    assert (sent, embedded) == (pages, pages)
    assert httpx.get(f"{api}/v1/collections/long").json()["count"] == pages


def test_two_workers_share_one_queue_and_run_each_request_once(api, env, logs):
    workers = [worker(env, BUSY, logs / f"once-busy-{i}.log", 0.2) for i in range(2)]
    texts = [f"request {i}" for i in range(32)]
    try:

        def post(text: str) -> httpx.Response:
            body = {"model": BUSY, "input": text, "output": "multivector", "encoding_format": "float"}
            return httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=60)

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(post, texts))
        sent, embedded = settled_items(api, BUSY, "text", len(texts))
        client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
        names = client.zrange(keys.workers_alive(BUSY, "text"), 0, -1)
        stats = [client.hgetall(keys.worker_stats(name.decode())) for name in names]
    finally:
        procs.stop(workers)
    for text, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["data"][0]["embedding"], _vectors(text.encode()), atol=1e-6)
    assert sent == embedded == len(texts)
    # Each worker fetched only what it could start soon (2 batches of 4), so both did a share.
    assert len(stats) == 2 and all(int(s[b"items"]) >= 4 for s in stats)


def test_a_dead_workers_pages_run_elsewhere_within_the_bound(api, env, logs):
    client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
    first = worker(env, SLOW, logs / "once-dead-a.log", 0.5)
    second = None
    try:
        create_collection(api, "survive", SLOW)
        pages = 12
        job = upload(api, "survive", [("die.pdf", make_pdf(pages, seed=22), "application/pdf")])
        deadline = time.monotonic() + 60
        while httpx.get(f"{api}/v1/jobs/{job['id']}").json()["processed"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = client.hlen("unacked")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed = time.monotonic()
        second = worker(env, SLOW, logs / "once-dead-b.log", 0.5)
        final = wait_job(api, job["id"], timeout=120)
        took = time.monotonic() - killed
        sent, embedded = settled_items(api, SLOW, "image", 16 + pages)
    finally:
        procs.stop([p for p in (first, second) if p])
    assert held > 0, "the killed worker held no page batch; the test proves nothing"
    assert final["status"] == "completed" and (final["processed"], final["failed"]) == (pages, 0)
    assert httpx.get(f"{api}/v1/collections/survive").json()["count"] == pages
    # Held work came back within the visibility timeout of the death (plus the restore interval and
    # the new worker's start); the rest of the job is at most the pages left at 0.5 s each.
    assert took < VISIBILITY_S + 8 + pages * 0.5
    assert embedded - sent <= held * 2  # only what the dead worker held ran twice


def test_a_poison_page_fails_its_batch_and_the_job_ends(api, env, logs):
    """The poison page kills every worker that runs it: once in a batch, then alone up to
    EMBEDQ_MAX_DELIVERIES (2) times; then its file fails with the reason, and the other pages,
    which shared its first batch, are stored."""
    current = worker(env, POISON, logs / "once-poison-0.log", 0.05)
    create_collection(api, "poisoned", POISON)
    files = [
        ("a.png", png((10, 120, 10)), "image/png"),
        ("bad.png", png((10, 10, 120), corner=(255, 0, 0)), "image/png"),
        ("c.png", png((120, 10, 10)), "image/png"),
    ]
    job = upload(api, "poisoned", files)
    deaths = 0
    deadline = time.monotonic() + 120
    try:
        while httpx.get(f"{api}/v1/jobs/{job['id']}").json()["finished_at"] is None:
            assert time.monotonic() < deadline, "the job never ended"
            if current.poll() is not None:
                deaths += 1
                assert deaths <= 4, "the poison page kept killing workers"
                # Not waited for: a new worker may take the poison page and die before it is seen live.
                current = spawn(
                    ["worker", "--model", POISON], {**env, "TEST_ITEM_S": "0.05"}, logs / f"once-poison-{deaths}.log"
                )
            time.sleep(0.2)
    finally:
        procs.stop([current])
    final = httpx.get(f"{api}/v1/jobs/{job['id']}").json()
    by_name = {f["filename"]: f for f in final["files"]}
    assert deaths == 3  # the first batch, then two runs alone
    assert by_name["bad.png"]["status"] == "failed" and "gave up after 2 runs" in by_name["bad.png"]["error"]
    assert by_name["a.png"]["status"] == by_name["c.png"]["status"] == "completed"
    assert (final["total"], final["processed"], final["failed"]) == (3, 2, 1)
    assert httpx.get(f"{api}/v1/collections/poisoned").json()["count"] == 2


def test_a_job_whose_model_has_no_live_worker_says_so_and_fails_after_the_stall_timeout(api, env, logs):
    idle = worker(env, IDLE, logs / "once-idle.log", 0.01)
    try:
        create_collection(api, "stalled", IDLE)
    finally:
        procs.stop([idle])
    time.sleep(3.5)  # the heartbeat TTL: the stopped worker is no longer live
    job = upload(api, "stalled", [("s.pdf", make_pdf(3, seed=23), "application/pdf")])
    events = sse_events(api, job["id"], timeout=STALL_S + 30)
    waiting = [data for _, name, data in events if name == "waiting"]
    assert waiting and waiting[0]["waiting"] == f"no live worker serves {IDLE} (image)"
    assert events[-1][1] == "failed"
    final = httpx.get(f"{api}/v1/jobs/{job['id']}").json()
    assert final["status"] == "failed" and (final["total"], final["failed"]) == (3, 3)
    assert "EMBEDQ_JOB_STALL_TIMEOUT_S" in final["files"][0]["error"]


def test_a_request_whose_caller_has_gone_is_not_computed(api, env, logs):
    busy = worker(env, BUSY, logs / "once-gone.log", 0.5)
    before = items(api).get(("embedded", BUSY, "text"), 0)
    try:

        def post(text: str, timeout: float) -> int:
            body = {"model": BUSY, "input": text, "output": "pooled"}
            try:
                return httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=timeout).status_code
            except httpx.TimeoutException:
                return 0

        with ThreadPoolExecutor(13) as pool:
            # 12 requests fill the worker (8 held, 4 queued: 6 s of work); the 13th gives up after 1 s.
            kept = [pool.submit(post, f"kept {i}", 60) for i in range(12)]
            time.sleep(0.3)
            gone = pool.submit(post, "gone", 1)
            statuses = [f.result() for f in kept]
        time.sleep(3)  # beats enough to publish all the worker embedded, the withdrawn request had it run
        embedded = items(api).get(("embedded", BUSY, "text"), 0)
    finally:
        procs.stop([busy])
    assert gone.result() == 0 and statuses == [200] * 12
    assert embedded - before == 12  # the gone caller's input was never computed
    revoked = re.search(r"^embedq_tasks_revoked_total (\S+)$", httpx.get(f"{api}/metrics").text, re.M)
    assert revoked and float(revoked.group(1)) >= 1


def test_a_stopping_worker_leaves_at_once_and_finishes_what_it_holds(api, env, logs):
    client = redis.Redis.from_url(env["EMBEDQ_REDIS_URL"])
    busy = worker(env, BUSY, logs / "once-stop.log", 0.3)
    try:
        with ThreadPoolExecutor(6) as pool:
            body = {"model": BUSY, "input": "held", "output": "pooled"}
            held = [pool.submit(httpx.post, f"{api}/v1/embeddings/text", json=body, timeout=60) for _ in range(6)]
            time.sleep(0.5)
            busy.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 1.0
            while any(
                m.decode().endswith(f":{busy.pid}") for m in client.zrange(keys.workers_alive(BUSY, "text"), 0, -1)
            ):
                assert time.monotonic() < deadline, "the stopping worker still says it is live"
                time.sleep(0.05)
            assert all(f.result().status_code == 200 for f in held)
        busy.wait(timeout=20)
    finally:
        procs.stop([busy])
    log = (logs / "once-stop.log").read_text()
    assert "Traceback" not in log


def test_limits_checked_by_workers_refuse_before_the_work(api, env, logs):
    """A multi-vector answer over EMBEDQ_MAX_RESPONSE_BYTES is a 413 before the forward pass; a PDF
    over EMBEDQ_MAX_PAGES_PER_FILE fails its file before a page is rendered."""
    busy = worker({**env, "EMBEDQ_MAX_RESPONSE_BYTES": "4096"}, BUSY, logs / "once-limits.log", 0.01)
    before = items(api).get(("embedded", BUSY, "text"), 0)
    try:
        body = {"model": BUSY, "input": [f"text {i}" for i in range(17)], "output": "multivector"}
        response = httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=30)  # 17 x 4 x 16 x 4 bytes
        assert response.status_code == 413, response.text
        assert "EMBEDQ_MAX_RESPONSE_BYTES" in response.json()["error"]["message"]
        body["input"] = body["input"][:16]  # 4,096 bytes: within the limit
        assert httpx.post(f"{api}/v1/embeddings/text", json=body, timeout=30).status_code == 200
        time.sleep(2)
        assert items(api).get(("embedded", BUSY, "text"), 0) - before == 16  # the refused 17 never ran
        create_collection(api, "limited", BUSY)
        job = upload(api, "limited", [("big.pdf", make_pdf(21, seed=24), "application/pdf")])
        final = wait_job(api, job["id"], timeout=60)
    finally:
        procs.stop([busy])
    assert final["status"] == "failed" and final["total"] == 0
    assert "limit is 20 (EMBEDQ_MAX_PAGES_PER_FILE)" in final["files"][0]["error"]
