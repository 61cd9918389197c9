"""`missing_tasks` tells a task the broker lost from one queued, held by a worker, or answered."""

from __future__ import annotations

import json
import uuid

import redis

from common.celery_app import create_celery_app
from common.delivery import UNACKED_KEY, missing_tasks, queue_lists
from common.keys import result_channel
from common.queues import EMBED_TASK, embed_queue
from common.settings import Settings

MODEL = "delivery-probe"


def test_only_tasks_in_no_place_are_missing(redis_url):
    client = redis.Redis.from_url(redis_url)
    celery = create_celery_app(Settings(redis_url=redis_url))
    queue = embed_queue(MODEL, "text")
    queued, urgent, held, answered, lost = (str(uuid.uuid4()) for _ in range(5))
    for task_id, priority in ((held, None), (lost, None), (queued, None), (urgent, 9)):
        celery.send_task(EMBED_TASK, kwargs={"model": MODEL, "modality": "text", "inputs": [{"text": "x" * 100_000}]},
                         task_id=task_id, priority=priority)
    try:
        # Take `held` and `lost` off the queue the way a worker's BRPOP does (oldest first); record
        # `held` in the unacked hash the way kombu then does, and let `lost` go with a dead worker.
        for _ in range(2):
            message = client.rpop(queue)
            if json.loads(message)["properties"]["correlation_id"] == held:
                client.hset(UNACKED_KEY, "probe-tag", json.dumps([json.loads(message), "", queue]))
        client.set(result_channel(answered), b"{}", ex=60)
        ids = [queued, urgent, held, answered, lost]
        assert [m.decode() for m in missing_tasks(client, queue, ids)] == [lost]
    finally:
        client.delete(*queue_lists(queue), result_channel(answered))
        client.hdel(UNACKED_KEY, "probe-tag")
