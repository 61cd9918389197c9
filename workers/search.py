"""The search worker's task: `embedq.search_pages` on the `search.pages` queue (a documented
contract, README "Direct Celery submission"). It answers from the worker's in-memory copy of the
collection (workers.page_index); the worker loads every late-interaction collection at start."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import redis

from common.celery_app import get_celery_app
from common.errors import InvalidRequest
from common.milvus_store import MilvusStore
from common.page_changes import PageChanges
from common.queues import SEARCH_TASK
from common.settings import get_settings

from .page_index import Searcher

app = get_celery_app()


@lru_cache
def searcher() -> Searcher:
    settings = get_settings()
    return Searcher(MilvusStore(settings.milvus_uri), PageChanges(redis.Redis.from_url(settings.redis_url)),
                    threads=settings.cpu_threads)


@app.task(name=SEARCH_TASK)
def search_pages(*, collection: str, query: bytes, dim: int, top_k: int = 10, filter: str | None = None) -> list[dict[str, Any]]:
    """The `top_k` pages of `collection` by exact MaxSim with `query`: its token vectors as
    little-endian float32 bytes, `dim` per token. Returns `[{doc_id, filename, page, score,
    metadata}]`, best first."""
    vectors = np.frombuffer(query, "<f4")
    if dim <= 0 or vectors.size % dim:
        raise InvalidRequest(f"query holds {vectors.size} numbers, not a whole number of {dim}-d vectors", "query")
    return searcher().search(collection, vectors.reshape(-1, dim), top_k, filter)
