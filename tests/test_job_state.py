"""Job state stays exact whatever is delivered twice or fails: a real Redis, the real `JobStore`,
`JobLedger` and `JobWatch`, no workers (those paths have end-to-end tests in test_work_once.py).

For every ended file, and so for the job: processed + failed + skipped = total."""

from __future__ import annotations

import json
import time

import pytest
import redis

from common import keys
from common.contract import INDEX_PAGES_TASK, INGEST_TASK
from common.delivery.app import create_celery_app
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore, UploadedFile
from common.jobs.units import page_unit
from common.jobs.watch import JobWatch
from common.settings import Settings
from common.store.blobs import BlobStore

MODEL = "state-probe"


@pytest.fixture
def client(redis_server):
    url = f"{redis_server}/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    return client


@pytest.fixture
def jobs(client, tmp_path) -> JobStore:
    return JobStore(client, 600, BlobStore(str(tmp_path / "blobs")))


def new_job(jobs: JobStore, files: int = 1) -> str:
    return jobs.create("pages", MODEL, [UploadedFile(f"f{i}.pdf", None, b"%PDF", {}, f"d{i}") for i in range(files)])


def pages(index: int, first: int, last: int) -> list[str]:
    return [page_unit(index, page) for page in range(first, last + 1)]


def adds_up(job: dict) -> bool:
    files = [f["processed"] + f["failed"] + f["skipped"] == f["total"] for f in job["files"]]
    return all(files) and job["processed"] + job["failed"] + job["skipped"] == job["total"]


def events(client, job_id: str) -> list[tuple[str, dict]]:
    return [
        (fields[b"event"].decode(), json.loads(fields[b"data"])) for _, fields in client.xrange(keys.job_events(job_id))
    ]


def test_a_redelivered_file_adds_its_pages_to_the_total_once(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 4)
    jobs.set_total(job_id, 0, 4)  # the same file ingested again after its worker died
    assert not jobs.record(job_id, 0, "processed", pages(0, 1, 2))
    assert not jobs.record(job_id, 0, "processed", pages(0, 1, 2))  # a batch run twice
    assert jobs.record(job_id, 0, "processed", pages(0, 3, 4))
    job = jobs.get(job_id)
    assert (job["status"], job["total"], job["processed"]) == ("completed", 4, 4) and adds_up(job)


def test_a_batch_run_twice_whose_second_run_fails_leaves_the_file_completed(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 4)
    assert not jobs.record(job_id, 0, "processed", pages(0, 1, 2))
    # The second delivery finds the page images the first one stored and dropped gone.
    assert not jobs.record(job_id, 0, "failed", pages(0, 1, 2), error="pages 1-2: page 1's image is gone")
    assert jobs.record(job_id, 0, "processed", pages(0, 3, 4))
    job = jobs.get(job_id)
    assert (job["status"], job["processed"], job["failed"]) == ("completed", 4, 0)
    assert job["files"][0]["error"] is None and adds_up(job)


def test_a_failing_batch_fails_its_own_pages_and_the_file_waits_for_the_rest(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 6)
    assert not jobs.record(job_id, 0, "failed", pages(0, 1, 2), error="pages 1-2: model failed")
    assert jobs.get(job_id)["files"][0]["status"] == "running"  # pages 3-6 are still in flight
    assert not jobs.record(job_id, 0, "processed", pages(0, 3, 4))
    assert jobs.record(job_id, 0, "processed", pages(0, 5, 6))
    job = jobs.get(job_id)
    assert job["files"][0]["status"] == "failed" and job["files"][0]["error"] == "pages 1-2: model failed"
    assert (job["processed"], job["failed"]) == (4, 2) and adds_up(job)


def test_a_file_failing_midway_fails_its_unsent_pages_and_ends_after_its_sent_batches(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 5)
    # pages 1-2 were sent; rendering page 3 failed
    assert not jobs.fail_file(job_id, 0, "page 3 of the PDF could not be rendered", pages(0, 3, 5))
    assert jobs.get(job_id)["status"] == "running"
    assert jobs.record(job_id, 0, "processed", pages(0, 1, 2))
    job = jobs.get(job_id)
    assert (job["status"], job["processed"], job["failed"]) == ("failed", 2, 3) and adds_up(job)


def test_a_file_that_cannot_be_read_fails_alone(jobs):
    job_id = new_job(jobs, files=2)
    assert not jobs.fail_file(job_id, 0, "the PDF could not be opened")
    jobs.set_total(job_id, 1, 1)
    assert jobs.record(job_id, 1, "processed", pages(1, 1, 1))
    job = jobs.get(job_id)
    assert job["status"] == "completed" and [f["status"] for f in job["files"]] == ["failed", "completed"]
    assert adds_up(job)


def test_an_abandoned_file_ends_now_and_later_reports_are_not_counted(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 4)
    jobs.record(job_id, 0, "processed", pages(0, 1, 1))
    assert jobs.abandon(job_id, 0, "no live worker serves m (image) for 600s")
    assert not jobs.record(job_id, 0, "processed", pages(0, 2, 4))  # a worker came back too late
    job = jobs.get(job_id)
    assert (job["status"], job["processed"], job["failed"]) == ("failed", 1, 3) and adds_up(job)
    assert events(jobs._client, job_id)[-1][0] == "failed"


def test_cancelling_an_ended_job_does_not_rewrite_it(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 1)
    jobs.record(job_id, 0, "processed", pages(0, 1, 1))
    assert jobs.cancel(job_id)["status"] == "completed"
    assert jobs.get(job_id)["status"] == "completed" and events(jobs._client, job_id)[-1][0] == "completed"


def test_a_cancelled_job_skips_what_is_left_and_ends_cancelled(jobs):
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 4)
    jobs.record(job_id, 0, "processed", pages(0, 1, 2))
    assert jobs.cancel(job_id)["status"] == "cancelled"
    assert jobs.record(job_id, 0, "skipped", pages(0, 3, 4))
    job = jobs.get(job_id)
    assert (job["status"], job["skipped"]) == ("cancelled", 2) and adds_up(job) and job["finished_at"]


def test_waiting_is_said_once_and_cleared(jobs, client):
    job_id = new_job(jobs)
    assert jobs.waiting(job_id, "no live worker serves m (image)") == 0
    time.sleep(1.1)
    assert jobs.waiting(job_id, "no live worker serves m (image)") >= 1
    assert jobs.get(job_id)["waiting"] == "no live worker serves m (image)"
    assert [name for name, _ in events(client, job_id)].count("waiting") == 1
    assert jobs.waiting(job_id, None) == 0
    assert jobs.get(job_id)["waiting"] is None


def test_the_watch_fails_a_job_no_live_worker_takes_after_the_stall_timeout(jobs, client, redis_server):
    celery = create_celery_app(Settings(redis_url=f"{redis_server}/11"))
    ledger = JobLedger(client, celery, 600)
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 3)
    ledger.send(job_id, INDEX_PAGES_TASK, {"job_id": job_id, "index": 0, "model": MODEL, "pages": [{"page": 1}]})
    watch = JobWatch(client, jobs, ledger, heartbeat_ttl_s=3, stall_timeout_s=1)
    watch.round()
    job = jobs.get(job_id)
    assert job["status"] == "running" and job["waiting"] == f"no live worker serves {MODEL} (image)"
    assert events(client, job_id)[-1] == ("waiting", {**events(client, job_id)[-1][1], "waiting": job["waiting"]})
    time.sleep(1.1)
    watch.round()
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["failed"] == 3 and adds_up(job)
    assert "EMBEDQ_JOB_STALL_TIMEOUT_S" in job["files"][0]["error"]
    watch.round()
    assert job_id not in ledger.open_jobs()


def test_the_watch_says_nothing_while_a_live_worker_serves_the_work(jobs, client, redis_server):
    celery = create_celery_app(Settings(redis_url=f"{redis_server}/11"))
    ledger = JobLedger(client, celery, 600)
    job_id = new_job(jobs)
    ledger.send(job_id, INGEST_TASK, {"job_id": job_id, "index": 0, "collection": "c", "model": MODEL})
    client.zadd(keys.INGEST_WORKERS_ALIVE, {"ingest@probe:1": time.time()})
    watch = JobWatch(client, jobs, ledger, heartbeat_ttl_s=3, stall_timeout_s=0.01)
    watch.round()
    assert jobs.get(job_id)["waiting"] is None and jobs.get(job_id)["status"] == "queued"


def test_the_watch_counts_the_work_of_a_task_that_ended_without_reporting(jobs, client, redis_server):
    celery = create_celery_app(Settings(redis_url=f"{redis_server}/11"))
    ledger = JobLedger(client, celery, 600)
    job_id = new_job(jobs)
    jobs.set_total(job_id, 0, 2)
    kwargs = {"job_id": job_id, "index": 0, "model": MODEL, "pages": [{"page": 1}, {"page": 2}]}
    task_id = ledger.send(job_id, INDEX_PAGES_TASK, kwargs)
    client.set(keys.result_channel(task_id), b"{}")  # Celery stored its failure; it never counted its pages
    client.zadd(keys.workers_alive(MODEL, "image"), {"m@probe:1": time.time()})
    JobWatch(client, jobs, ledger, heartbeat_ttl_s=3, stall_timeout_s=60).round()
    job = jobs.get(job_id)
    assert job["status"] == "failed" and job["failed"] == 2 and adds_up(job)
    assert "ended without reporting" in job["files"][0]["error"]
    assert ledger.pending_queues(job_id) == {}


def test_the_ledger_counts_the_items_it_sends(jobs, client, redis_server):
    celery = create_celery_app(Settings(redis_url=f"{redis_server}/11"))
    ledger = JobLedger(client, celery, 600)
    job_id = new_job(jobs)
    ledger.send(job_id, INDEX_PAGES_TASK, {"job_id": job_id, "index": 0, "model": MODEL, "pages": [{"page": 1}] * 3})
    ledger.send(job_id, INGEST_TASK, {"job_id": job_id, "index": 0, "collection": "c", "model": MODEL})
    assert client.hgetall(keys.ITEMS) == {f"sent:{MODEL}:image".encode(): b"3"}


def test_uploads_wait_in_the_blob_store_and_go_with_their_job(jobs, client, redis_server):
    job_id = jobs.create("pages", MODEL, [UploadedFile("a.pdf", None, b"%PDF-1.7 upload", {}, "d")])
    assert jobs.upload(job_id, 0) == b"%PDF-1.7 upload"
    assert b"%PDF-1.7" not in b"".join(client.dump(key) or b"" for key in client.keys("*"))  # not in Redis
    celery = create_celery_app(Settings(redis_url=f"{redis_server}/11"))
    ledger = JobLedger(client, celery, 600)
    ledger.send(job_id, INGEST_TASK, {"job_id": job_id, "index": 0, "collection": "c", "model": MODEL})
    jobs.abandon_job(job_id, "no live ingestion worker for 600s")
    JobWatch(client, jobs, ledger, heartbeat_ttl_s=3, stall_timeout_s=60).round()
    assert jobs.upload(job_id, 0) is None  # the ended job's upload is gone
