"""The CPU side of ingestion: turn one uploaded file into pages or text chunks and queue them.

PDF pages go to the model's image queue in small batches as they are rendered, not after the
whole file, each page image in the blob store and its key in the task; each page is also kept there
to be seen (full size and a thumbnail), with the document's record. Text is chunked and goes to the
model's text queue. A file that cannot be read fails alone, with its message, and the other files
of its upload go on. This module loads no model.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from celery import shared_task
from celery.exceptions import Reject
from PIL import Image
from redis import RedisError

from common.contract import INDEX_CHUNKS_TASK, INDEX_PAGES_TASK, INGEST_TASK
from common.errors import EmbedqError, InvalidRequest
from common.inputs.documents import (
    chunk_text,
    count_pdf_pages,
    decode_text,
    parse_jsonl,
    render_pdf_pages,
)
from common.inputs.images import encode_png, load_image, page_views
from common.inputs.kinds import detect_kind
from common.inputs.office import convert_office_to_pdf
from common.jobs.state import JobStore
from common.jobs.units import chunk_unit, page_unit
from common.store.blobs import page_image_key, page_key

from .. import process

log = logging.getLogger(__name__)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@shared_task(name=INGEST_TASK, bind=True, ignore_result=True)
def ingest_file(
    self,
    *,
    job_id: str,
    index: int,
    collection: str,
    model: str,
    content_type: str | None = None,
    pool_factor: int = 1,
) -> None:
    """Render or chunk one uploaded file and queue its batches (`pool_factor`: the page
    collection's, passed on to its page batches). Redelivered because the worker process running
    it died, it runs counted (common.delivery.crashes), and the file fails once such runs reach
    EMBEDQ_MAX_DELIVERIES."""
    proc = process.current()
    try:
        if not (self.request.delivery_info or {}).get("redelivered"):
            _ingest(job_id, index, collection, model, content_type, pool_factor)
        elif proc.crashes.exhausted(self.request.id):
            proc.jobs.abandon(job_id, index, proc.crashes.gave_up(self.request.id))
        else:
            with proc.crashes.running(self.request.id):
                _ingest(job_id, index, collection, model, content_type, pool_factor)
    except RedisError as exc:
        # The job's state is out of reach (Redis restarting): the file is not done, nor failed. The
        # message goes back (or, its channel gone with the connection, the visibility timeout
        # restores it) and the file runs again from its upload; no failure is stored for the job
        # watch to count.
        log.warning("ingesting file %d of job %s: Redis failed (%s); it runs again", index, job_id, exc)
        raise Reject(exc, requeue=True) from exc
    proc.ledger.done(job_id, self.request.id)


class _File:
    """One file being queued: the units it has, and which of them are on their way."""

    def __init__(self, jobs: JobStore, target: dict[str, Any], pool_factor: int):
        self.jobs, self.target, self.pool_factor = jobs, target, pool_factor
        self.job_id, self.index = target["job_id"], target["index"]
        self.units: list[str] = []
        self.sent: set[str] = set()

    def total(self, units: list[str]) -> None:
        self.units = units
        self.jobs.set_total(self.job_id, self.index, len(units))

    def send(self, task: str, units: list[str], **kwargs: Any) -> None:
        """Queue a batch, unless the job is cancelled: then this and every unit not yet sent is skipped."""
        if self.jobs.is_cancelled(self.job_id):
            self.jobs.record(self.job_id, self.index, "skipped", self.unsent())
            raise _Cancelled
        process.current().ledger.send(self.job_id, task, {**self.target, **kwargs})
        self.sent.update(units)

    def send_pages(self, pages: list[dict[str, Any]]) -> None:
        """Queue a batch of pages, to be stored pooled by the collection's factor."""
        units = [page_unit(self.index, p["page"]) for p in pages]
        self.send(INDEX_PAGES_TASK, units, pages=pages, pool_factor=self.pool_factor)

    def keep_document(self, doc_id: str, metadata: dict[str, Any], pages: int | None = None, chunks: int | None = None):
        """The document's record in the blob store (common.store.blobs), for listings."""
        record = {"doc_id": doc_id, "filename": self.target["filename"], "pages": pages, "chunks": chunks}
        record |= {"metadata": metadata, "created": int(time.time())}
        process.current().blobs.put_document(self.target["collection"], record)

    def keep_page(self, page: int, image: Image.Image) -> None:
        """The page's full-size image and thumbnail, to be seen."""
        proc = process.current()
        views = page_views(image, proc.settings.page_image_quality, proc.settings.thumb_width)
        for view, data in views.items():
            proc.blobs.put(page_image_key(self.target["collection"], self.target["doc_id"], page, view), data)

    def unsent(self) -> list[str]:
        return [unit for unit in self.units if unit not in self.sent]

    def fail(self, error: str) -> None:
        """The file failed: the units never sent fail with `error`; the sent ones still report."""
        self.jobs.fail_file(self.job_id, self.index, error, self.unsent())


class _Cancelled(Exception):
    """The job was cancelled while its file was being queued."""


def _ingest(job_id: str, index: int, collection: str, model: str, content_type: str | None, pool_factor: int) -> None:
    settings = process.current().settings
    jobs = process.current().jobs
    info = jobs.file_info(job_id, index)
    data = jobs.upload(job_id, index)
    if data is None:
        # Gone after its pages or chunks were queued: this is a second delivery of a done file.
        if info.get("status") == "queued":
            jobs.fail_file(job_id, index, "the upload expired before it was processed")
        return
    target = {
        "job_id": job_id,
        "index": index,
        "collection": collection,
        "model": model,
        "doc_id": info["doc_id"],
        "filename": info["filename"],
        "metadata": info["metadata"],
    }
    file = _File(jobs, target, pool_factor)
    try:
        kind = detect_kind(info["filename"], content_type, data[:8192])
        jobs.set_kind(job_id, index, kind)
        if kind == "office":
            pdf = convert_office_to_pdf(data, info["filename"], settings.office_timeout_s, settings.office_memory_mb)
            data, kind = pdf, "pdf"
        if kind == "pdf":
            _queue_pdf(file, data)
        elif kind == "image":
            _queue_image(file, data)
        else:
            _queue_text(file, data, kind)
    except _Cancelled:
        pass
    except EmbedqError as exc:
        file.fail(exc.message)
    except RedisError:
        raise
    except Exception as exc:  # never leave a job waiting on a file that died here
        log.exception("ingesting %s of job %s failed", info["filename"], job_id)
        file.fail(f"internal error: {exc}")
    # Only once the file's outcome is on the job: a Redis that went away mid-file leaves the upload
    # in the blob store for the redelivery, which runs the file again (its pages count once).
    jobs.drop_upload(job_id, index)


def _queue_pdf(file: _File, data: bytes) -> None:
    settings = process.current().settings
    total = count_pdf_pages(data)
    if total > settings.max_pages_per_file:
        raise InvalidRequest(
            f"the document has {total} pages; the limit is {settings.max_pages_per_file} (EMBEDQ_MAX_PAGES_PER_FILE)",
            "files",
        )
    file.total([page_unit(file.index, page) for page in range(1, total + 1)])
    rendered = render_pdf_pages(data, settings.pdf_dpi(total), settings.max_image_pixels)
    file.keep_document(file.target["doc_id"], file.target["metadata"], pages=total)
    for batch in _batches(rendered, settings.ingest_pages_per_task):
        file.send_pages([_page_blob(file, page + 1, image, encode_png(image)) for page, image in batch])


def _page_blob(file: _File, page: int, image: Image.Image, data: bytes) -> dict[str, Any]:
    """The page image in the blob store, the task carrying its key (common.store.blobs), and the
    page kept to be seen."""
    key = page_key(file.job_id, file.index, page)
    process.current().blobs.put(key, data)
    file.keep_page(page, image)
    return {"page": page, "blob": key}


def _queue_image(file: _File, data: bytes) -> None:
    image = load_image(data, process.current().settings.max_image_pixels)  # a bad image fails here, as its file's error
    file.total([page_unit(file.index, 1)])
    file.keep_document(file.target["doc_id"], file.target["metadata"], pages=1)
    file.send_pages([_page_blob(file, 1, image, data)])


def _queue_text(file: _File, data: bytes, kind: str) -> None:
    settings = process.current().settings
    metadata = file.target["metadata"]
    if kind == "jsonl":
        records = [(r["id"], r["text"], {**metadata, **r["metadata"]}) for r in parse_jsonl(data)]
    else:
        records = [(file.target["doc_id"], decode_text(data), metadata)]
    chunks = [
        {"doc_id": doc_id, "chunk": number, "text": text, "metadata": meta}
        for doc_id, body, meta in records
        for number, text in enumerate(chunk_text(body, settings.chunk_size, settings.chunk_overlap))
    ]
    file.total([chunk_unit(file.index, c) for c in chunks])
    counts = Counter(c["doc_id"] for c in chunks)
    for doc_id, meta in {c["doc_id"]: c["metadata"] for c in chunks}.items():
        file.keep_document(doc_id, meta, chunks=counts[doc_id])
    for batch in _batches(chunks, settings.ingest_chunks_per_task):
        file.send(INDEX_CHUNKS_TASK, [chunk_unit(file.index, c) for c in batch], chunks=batch)
