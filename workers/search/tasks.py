"""The search worker's task: `embedq.search_pages` on the `search.pages` queue (a documented
contract, README "Direct Celery submission"). It answers from the worker's in-memory copy of the
collection (workers.search.scan); the worker loads every late-interaction collection at start."""

from __future__ import annotations

from typing import Any

import numpy as np
from celery import shared_task

from common.contract import SEARCH_TASK
from common.errors import InvalidRequest, NotFound

from .. import process


@shared_task(name=SEARCH_TASK)
def search_pages(
    *,
    collection: str,
    query: bytes,
    dim: int,
    top_k: int = 10,
    filter: str | None = None,
    shards: list[int] | None = None,
    worker: str | None = None,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """The `top_k` pages of `collection` by exact MaxSim with `query`: its token vectors as
    little-endian float32 bytes, `dim` per token. Returns `[{doc_id, filename, page, score,
    metadata}]`, best first. `shards`: only the pages of those (default: every page; with
    EMBEDQ_SEARCH_SHARDS above 1 the API asks each shard's owner for its own); `worker` only routes
    the task to that worker's queue. `tenant`: the collection must be that tenant's (common.tenants),
    or it is not found; without it any collection is searched (Redis access is full trust)."""
    vectors = np.frombuffer(query, "<f4")
    if dim <= 0 or vectors.size % dim:
        raise InvalidRequest(f"query holds {vectors.size} numbers, not a whole number of {dim}-d vectors", "query")
    if tenant is not None and process.current().store.describe(collection).tenant != tenant:
        raise NotFound(f"No collection '{collection}'.", "collection")
    return process.current().searcher.search(collection, vectors.reshape(-1, dim), top_k, filter, shards)
