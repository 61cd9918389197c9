"""`missing_tasks` tells a task the broker lost from one queued, held by a worker, or answered;
`JobLedger` sends a job's lost task again, once, after a worker died, and forgets a task that
reported; a heartbeat that drops a silent worker records the death."""

from __future__ import annotations

import base64
import json
import time
import uuid

import msgpack
import pytest
import redis

from common import keys
from common.contract import EMBED_TASK, INDEX_PAGES_TASK, embed_queue
from common.delivery import heartbeat
from common.delivery.app import create_celery_app
from common.delivery.lost import UNACKED_KEY, missing_tasks, queue_lists
from common.jobs.ledger import JobLedger
from common.jobs.state import JobStore, UploadedFile
from common.jobs.watch import JobWatch
from common.keys import result_channel
from common.settings import Settings
from common.store.blobs import BlobStore

MODEL = "delivery-probe"


def test_only_tasks_in_no_place_are_missing(redis_url):
    client = redis.Redis.from_url(redis_url)
    celery = create_celery_app(Settings(redis_url=redis_url))
    queue = embed_queue(MODEL, "text")
    queued, urgent, held, answered, lost = (str(uuid.uuid4()) for _ in range(5))
    for task_id, priority in ((held, None), (lost, None), (queued, None), (urgent, 9)):
        celery.send_task(
            EMBED_TASK,
            kwargs={"model": MODEL, "modality": "text", "inputs": [{"text": "x" * 100_000}]},
            task_id=task_id,
            priority=priority,
        )
    try:
        # Take `held` and `lost` off the queue the way a worker's BRPOP does (oldest first); record
        # `held` in the unacked hash the way kombu then does, and let `lost` go with a dead worker.
        for _ in range(2):
            message = client.rpop(queue)
            if json.loads(message)["properties"]["correlation_id"] == held:
                client.hset(UNACKED_KEY, "probe-tag", json.dumps([json.loads(message), "", queue]))
        client.set(result_channel(answered), b"{}", ex=60)
        ids = [queued, urgent, held, answered, lost]
        assert missing_tasks(client, [queue], ids) == [lost]
    finally:
        client.delete(*queue_lists(queue), result_channel(answered))
        client.hdel(UNACKED_KEY, "probe-tag")


@pytest.fixture
def own_db(redis_server):
    """A database of its own: no other test's ingestion worker sweeps these jobs."""
    url = f"{redis_server}/12"
    redis.Redis.from_url(url).flushdb()
    return url


def test_a_job_task_the_broker_lost_is_sent_again_once(own_db, tmp_path):
    client = redis.Redis.from_url(own_db)
    celery = create_celery_app(Settings(redis_url=own_db))
    tasks = JobLedger(client, celery, ttl_s=600)
    jobs = JobStore(client, 600, BlobStore(str(tmp_path)))
    job_id = jobs.create("pages", MODEL, [UploadedFile("a.pdf", None, b"%PDF", {}, "doc")])
    queue = embed_queue(MODEL, "image")
    kwargs = {"job_id": job_id, "model": MODEL, "pages": [{"page": 1, "image": b"\x89PNG" * 1000}]}
    lost = tasks.send(job_id, INDEX_PAGES_TASK, kwargs)
    queued = tasks.send(job_id, INDEX_PAGES_TASK, kwargs)
    assert json.loads(client.rpop(queue))["properties"]["correlation_id"] == lost

    assert tasks.resend_lost(job_id) == 0  # no worker died: nothing can have been lost
    client.set(keys.WORKER_DIED_AT, time.time())
    assert tasks.resend_lost(job_id) == 1
    assert tasks.resend_lost(job_id) == 0  # both seen since
    messages = {m["properties"]["correlation_id"]: m for m in map(json.loads, client.lrange(queue, 0, -1))}
    assert sorted(messages) == sorted([lost, queued])
    _, resent_kwargs, _ = msgpack.unpackb(base64.b64decode(messages[lost]["body"]))
    assert resent_kwargs == kwargs  # the same task, bytes and all

    tasks.done(job_id, lost)
    tasks.done(job_id, queued)
    client.delete(queue)
    client.set(keys.WORKER_DIED_AT, time.time())
    assert tasks.resend_lost(job_id) == 0  # nothing left to look after
    assert tasks.pending_queues(job_id) == {}
    assert job_id in tasks.open_jobs()
    client.hset(keys.job(job_id), "finished_at", 1)
    watch = JobWatch(client, jobs, tasks, heartbeat_ttl_s=3, stall_timeout_s=60)
    watch.round()
    assert job_id not in tasks.open_jobs()  # an ended job is forgotten


def test_a_heartbeat_that_drops_a_silent_worker_records_the_death(own_db):
    client = redis.Redis.from_url(own_db)
    members = "embedq:workers:probe:text"
    heartbeat.beat(client, [members], "a", ttl_s=60)
    heartbeat.beat(client, [members], "b", ttl_s=60)
    assert not client.exists(keys.WORKER_DIED_AT)  # everyone is live
    client.zadd(members, {"a": time.time() - 61})  # a went silent
    before = time.time()
    heartbeat.beat(client, [members], "b", ttl_s=60)
    assert client.zrange(members, 0, -1) == [b"b"]
    assert float(client.get(keys.WORKER_DIED_AT)) >= before
