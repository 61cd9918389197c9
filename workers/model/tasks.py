"""The Celery tasks a model worker runs. Names, queues and argument shapes are a documented
contract (README, "Direct Celery submission"), so other Python backends can submit them directly.

- `embedq.embed` answers online requests with vectors, `embedq.tokenize` with the model's tokens;
- `embedq.index_pages` / `embedq.index_chunks` embed a batch of an ingestion job's pages or text
  chunks and write them to the job's collection, then count them on the job. A page or chunk whose
  bytes the embedding cache holds (common.cache) is stored without model work.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from typing import Any

import numpy as np
import redis
from celery import shared_task

from common.cache.client import add_counts
from common.contract import EMBED_TASK, INDEX_CHUNKS_TASK, INDEX_PAGES_TASK, TOKENIZE_TASK
from common.errors import BackendError, EmbedqError, InvalidRequest, ServiceUnavailable
from common.jobs.units import chunk_unit, page_unit
from common.store.milvus import ChunkRecord, PageRecord
from common.vectors import check_answer_bytes, pack

from .. import process
from ..backends.base import EmbedInput, Prepared, finalize
from ..backends.tokens import text_of
from .batcher import Dropped, Origin
from .pooling import pool_pages
from .runtime import Runtime

log = logging.getLogger(__name__)

WAIT_STEP_S = 5.0  # how often a task waiting on the batcher checks that it still runs


def origin(task) -> Origin:
    """Where the task's inputs come from, for the batcher: its id, its deadline (the message's
    `expires`), and, for a message redelivered because its worker died, `alone` with a guard that
    counts the runs a death cuts short (common.delivery.crashes)."""
    request = task.request
    expires = request.expires
    deadline = datetime.fromisoformat(expires).timestamp() if isinstance(expires, str) else math.inf
    if not (request.delivery_info or {}).get("redelivered"):
        return Origin(request.id, deadline)
    crashes = process.current().crashes
    return Origin(request.id, deadline, alone=True, guard=lambda: crashes.running(request.id))


def exhausted(task) -> str | None:
    """Why a redelivered task must not run again (it killed its worker too often), or None."""
    if not (task.request.delivery_info or {}).get("redelivered"):
        return None
    crashes = process.current().crashes
    return crashes.gave_up(task.request.id) if crashes.exhausted(task.request.id) else None


def run_model(
    model: str,
    modality: str,
    items: list[EmbedInput],
    source: Origin,
    check: Callable[[list[Prepared]], None] = lambda prepared: None,
) -> tuple[list[np.ndarray], list[Prepared]]:
    """The raw model outputs for `items`, batched with whatever else this worker has pending;
    `check` may refuse the prepared inputs before they reach the device. The wait ends at the
    source's deadline, or when the batcher stops running."""
    rt = process.current().runtime
    if model != rt.spec.name or modality not in rt.modalities:
        raise InvalidRequest(f"This worker serves {rt.spec.name} {rt.modalities}, not {model} {modality}.", "model")
    prepared = [rt.backend.prepare(item) for item in items]
    check(prepared)
    futures = rt.batcher.submit(modality, prepared, source)
    try:
        return [_result(future, rt, source.deadline) for future in futures], prepared
    except Dropped as exc:
        raise ServiceUnavailable(f"Not computed: {exc}.") from None
    except EmbedqError:
        raise
    except Exception as exc:
        raise BackendError(f"The model failed on this batch: {exc}") from exc


def _result(future, rt: Runtime, deadline: float) -> np.ndarray:
    while True:
        try:
            return future.result(timeout=max(min(WAIT_STEP_S, deadline - time.time()), 0))
        except FutureTimeout:
            if time.time() >= deadline:
                raise ServiceUnavailable("The model did not answer before the request's deadline.") from None
            if not rt.batcher.alive:
                raise ServiceUnavailable(f"The batcher stopped: {rt.batcher.error!r}") from None


def stored_vectors(model: str, modality: str, inputs: list[dict[str, Any]], source: Origin) -> list[np.ndarray]:
    """Each input's vectors as a collection stores them, before any token pooling: a late-interaction
    model's token vectors, normalized, in float16; another model's one normalized float32 vector.
    Those the cache holds (under the key of an online request for that same output) are not
    computed; the others are, and go into the cache."""
    proc = process.current()
    spec, cache = proc.runtime.spec, proc.cache
    multivector = spec.multivector
    dtype = "float16" if multivector else "float32"
    options = {"output": "multivector" if multivector else "pooled", "normalize": True, "dtype": dtype}
    lookup = cache.lookup(spec, modality, inputs, options) if cache else None
    todo = lookup.missing if lookup else range(len(inputs))
    arrays, tokens = [], []
    if todo:
        items = [EmbedInput(modality, input_type="document", **inputs[i]) for i in todo]
        raw, prepared = run_model(model, modality, items, source)
        arrays = [finalize(a, pooled=not multivector, normalize=True, dimensions=None).astype(dtype) for a in raw]
        tokens = [p.n_tokens for p in prepared]
    if lookup is None:
        return arrays
    cache.store(lookup, arrays, tokens)
    _add_cache_counts(proc.redis, cache.take_counts())
    return lookup.merge(arrays, tokens)[0]


def _add_cache_counts(client: redis.Redis, counts: Counter[str]) -> None:
    try:
        with client.pipeline(transaction=False) as pipe:
            add_counts(pipe, counts)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("counting the cache's lookups failed: %s", exc)


@shared_task(name=EMBED_TASK, bind=True, throws=(EmbedqError,))
def embed(
    self,
    *,
    model: str,
    modality: str,
    inputs: list[dict[str, Any]],
    output: str = "pooled",
    normalize: bool | None = None,
    dimensions: int | None = None,
    input_type: str = "document",
    truncate: bool = True,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Embed `inputs` (each `{"text": str}`, `{"token_ids": [int]}` or `{"image": bytes}`).

    Returns `{"dtype", "shapes", "data": [bytes per input], "tokens": [int per input]}`:
    pooled output gives shape `(dim,)`, multivector `(n_tokens, dim)`; `tokens` is multivector for
    a late-interaction model and, for a text model, every token's last hidden state.
    """
    spec = process.current().runtime.spec
    if output == "multivector" and not spec.multivector:
        raise InvalidRequest(f"The model '{model}' gives one vector per input; output must be 'pooled'.", "output")
    if output == "tokens" and not (spec.multivector or spec.backend == "text"):
        raise InvalidRequest(f"The model '{model}' gives no token vectors here.", "output")
    if reason := exhausted(self):
        raise BackendError(f"These inputs were not embedded: {reason}.")
    items = [
        EmbedInput(
            modality=modality,
            input_type=input_type,
            truncate=truncate,
            dimensions=dimensions,
            token_vectors=output == "tokens",
            **entry,
        )
        for entry in inputs
    ]
    width = np.dtype(dtype).itemsize * (dimensions or process.current().runtime.backend.dim)

    def check_size(prepared: list[Prepared]) -> None:
        rows = len(prepared) if output == "pooled" else sum(p.n_tokens for p in prepared)
        check_answer_bytes(rows * width, process.current().settings.max_response_bytes)

    arrays, prepared = run_model(model, modality, items, origin(self), check=check_size)
    normalize = spec.normalize if normalize is None else normalize
    vectors = [finalize(a, pooled=output == "pooled", normalize=normalize, dimensions=dimensions) for a in arrays]
    return {**pack(vectors, dtype), "tokens": [p.n_tokens for p in prepared]}


@shared_task(name=TOKENIZE_TASK, throws=(EmbedqError,))
def tokenize(
    *, model: str, modality: str, texts: list[str], input_type: str = "document", add_special_tokens: bool = True
) -> dict[str, Any]:
    """The tokens of each text as the model sees it (a query with the model's query prefix):
    `{"texts": [the text tokenized], "tokens": [[[id, text, special, start, stop], ...] per text]}`,
    offsets in characters of those texts."""
    rt = process.current().runtime
    if model != rt.spec.name:
        raise InvalidRequest(f"This worker serves {rt.spec.name}, not {model}.", "model")
    if not hasattr(rt.backend, "tokenize"):
        raise InvalidRequest(f"The model '{model}' does not tokenize here.", "model")
    seen = [text_of(rt.spec, EmbedInput(modality, text=text, input_type=input_type)) for text in texts]
    tokens = [[list(piece) for piece in rt.backend.tokenize(text, add_special_tokens)] for text in seen]
    return {"texts": seen, "tokens": tokens}


def _index(task, job_id: str, index: int, collection: str, units: list[str], what: str, write) -> None:
    """Run `write(origin)` for a batch of a job's units unless the job is cancelled or the batch
    killed its worker too often, and count the units as processed, failed (with the error on their
    file) or skipped. A batch that fails is counted, so its job still finishes. The report that
    finishes the job flushes the collection, so its rows are searched through the index, not by
    brute force."""
    proc = process.current()
    jobs = proc.jobs
    try:
        if jobs.is_cancelled(job_id):
            finished = jobs.record(job_id, index, "skipped", units)
        elif reason := exhausted(task):
            finished = jobs.record(job_id, index, "failed", units, error=f"{what}: {reason}")
        else:
            write(origin(task))
            finished = jobs.record(job_id, index, "processed", units)
    except Exception as exc:
        if not isinstance(exc, EmbedqError):
            log.exception("indexing %s of job %s failed", what, job_id)
        finished = jobs.record(job_id, index, "failed", units, error=f"{what}: {exc}")
    proc.ledger.done(job_id, task.request.id)
    if finished:
        proc.store.flush(collection)


@shared_task(name=INDEX_PAGES_TASK, bind=True, ignore_result=True)
def index_pages(
    self,
    *,
    job_id: str,
    index: int,
    collection: str,
    model: str,
    doc_id: str,
    filename: str,
    metadata: dict[str, Any],
    pages: list[dict[str, Any]],
    pool_factor: int = 1,
) -> None:
    """Embed page images (`[{"page": int, "image": bytes}]`, or `{"page", "blob": key}` for an image in
    the blob store) and store their token vectors, pooled by `pool_factor` (the collection's; see
    workers.model.pooling), or a single-vector model's one vector per page; the page blobs go once
    the batch is counted."""
    blobs = process.current().blobs

    def image(page: dict[str, Any]) -> bytes:
        if "image" in page:
            return page["image"]
        data = blobs.get(page["blob"])
        if data is None:
            raise InvalidRequest(f"page {page['page']}'s image is gone from the blob store", "pages")
        return data

    def write(source: Origin) -> None:
        vectors = stored_vectors(model, "image", [{"image": image(p)} for p in pages], source)
        if process.current().runtime.spec.multivector:
            vectors = pool_pages(vectors, pool_factor)
        process.current().store.upsert_pages(
            collection,
            [
                PageRecord(doc_id=doc_id, page=p["page"], filename=filename, metadata=metadata, vectors=v)
                for p, v in zip(pages, vectors)
            ],
        )

    first, last = pages[0]["page"], pages[-1]["page"]
    _index(
        self,
        job_id,
        index,
        collection,
        [page_unit(index, p["page"]) for p in pages],
        f"pages {first}-{last} of {filename}",
        write,
    )
    blobs.delete(*(p["blob"] for p in pages if "blob" in p))


@shared_task(name=INDEX_CHUNKS_TASK, bind=True, ignore_result=True)
def index_chunks(
    self,
    *,
    job_id: str,
    index: int,
    collection: str,
    model: str,
    doc_id: str,
    filename: str,
    metadata: dict[str, Any],
    chunks: list[dict[str, Any]],
) -> None:
    """Embed text chunks (`[{"doc_id", "chunk", "text", "metadata"}]`) and store one vector each."""

    def write(source: Origin) -> None:
        vectors = stored_vectors(model, "text", [{"text": c["text"]} for c in chunks], source)
        process.current().store.upsert_chunks(
            collection,
            [
                ChunkRecord(
                    doc_id=c["doc_id"],
                    chunk=c["chunk"],
                    filename=filename,
                    text=c["text"],
                    metadata=c["metadata"],
                    vector=vector,
                )
                for c, vector in zip(chunks, vectors)
            ],
        )

    _index(
        self,
        job_id,
        index,
        collection,
        [chunk_unit(index, c) for c in chunks],
        f"chunks of {filename}",
        write,
    )
