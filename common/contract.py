"""The task contract: task names, the queues they go to (one function derives every queue name),
the Celery routing built on it, and the builders of the documented tasks' arguments. The API, the
ingestion worker and direct submitters (common.client) all send through these."""

from __future__ import annotations

from typing import Any

import numpy as np

EMBED_TASK = "embedq.embed"
INDEX_PAGES_TASK = "embedq.index_pages"
INDEX_CHUNKS_TASK = "embedq.index_chunks"
INGEST_TASK = "embedq.ingest_file"
INGEST_QUEUE = "ingest.cpu"
SEARCH_TASK = "embedq.search_pages"
TOKENIZE_TASK = "embedq.tokenize"
SEARCH_QUEUE = "search.pages"


def embed_queue(model: str, modality: str) -> str:
    """`embed.<model>.<modality>`: one queue per served model and modality (text / image)."""
    return f"embed.{model}.{modality}"


def embed_queue_parts(queue: str) -> tuple[str, str]:
    """(model, modality) of an `embed_queue` name; model names may hold dots."""
    model, _, modality = queue.removeprefix("embed.").rpartition(".")
    return model, modality


# EMBED_TASK's options, each with the value the task takes when it is not sent (its signature's).
EMBED_OPTIONS = {
    "output": "pooled",
    "normalize": None,
    "dimensions": None,
    "input_type": "document",
    "truncate": True,
    "dtype": "float32",
}


def embed_kwargs(model: str, modality: str, inputs: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """The arguments of EMBED_TASK: `inputs` (each `{"text"}`, `{"token_ids"}` or `{"image": bytes}`)
    and the task's options (`output`: `pooled`, `multivector` or `tokens`; `normalize`, `dimensions`,
    `input_type`, `truncate`, `dtype`)."""
    return {"model": model, "modality": modality, "inputs": inputs, **options}


def tokenize_kwargs(model: str, texts: list[str], input_type: str, add_special_tokens: bool) -> dict[str, Any]:
    """The arguments of TOKENIZE_TASK, which goes to the model's text queue like its embeddings."""
    return {
        "model": model,
        "modality": "text",
        "texts": texts,
        "input_type": input_type,
        "add_special_tokens": add_special_tokens,
    }


def search_queue(worker: str | None = None) -> str:
    """`search.pages`, which any search worker takes, or `search.pages.<worker>`, that worker's own."""
    return SEARCH_QUEUE if worker is None else f"{SEARCH_QUEUE}.{worker}"


def search_kwargs(
    collection: str,
    query: np.ndarray,
    top_k: int,
    filter: str | None,
    shards: list[int] | None = None,
    worker: str | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """The arguments of SEARCH_TASK: the query's (n_tokens, dim) vectors as little-endian float32
    bytes; `shards` to search (default: all, common.shards), `worker` to route it to (default: any),
    `tenant` the collection must belong to (default: any; common.tenants)."""
    query = np.ascontiguousarray(query, "<f4")
    kwargs = {
        "collection": collection,
        "query": query.tobytes(),
        "dim": int(query.shape[-1]),
        "top_k": top_k,
        "filter": filter,
    }
    if shards is not None:
        kwargs["shards"] = shards
    if worker is not None:
        kwargs["worker"] = worker
    if tenant is not None:
        kwargs["tenant"] = tenant
    return kwargs


def task_items(name: str, kwargs: dict[str, Any]) -> int:
    """How many items (inputs, pages, chunks) a task carries; 1 for a task of other work."""
    for field in ("inputs", "pages", "chunks"):
        if isinstance(kwargs.get(field), list):
            return len(kwargs[field])
    return 1


def task_queue(name: str, kwargs: dict[str, Any]) -> str | None:
    """The queue of an embedq task, from its name and arguments; None for a task that is not ours."""
    if name in (EMBED_TASK, TOKENIZE_TASK):
        return embed_queue(kwargs["model"], kwargs["modality"])
    if name == INDEX_PAGES_TASK:
        return embed_queue(kwargs["model"], "image")
    if name == INDEX_CHUNKS_TASK:
        return embed_queue(kwargs["model"], "text")
    if name == INGEST_TASK:
        return INGEST_QUEUE
    if name == SEARCH_TASK:
        return search_queue(kwargs.get("worker"))
    return None


def route_task(name: str, args: tuple, kwargs: dict[str, Any], options: dict, task=None, **_: Any) -> dict | None:
    """Celery router. Every embedq task must get a queue here, or it falls back to the default queue
    where no worker listens (tests check each registered task has a route)."""
    queue = task_queue(name, kwargs)
    return {"queue": queue} if queue else None
