"""The CPU side of ingestion: turn one uploaded file into pages or text chunks and queue them.

PDF pages go to the model's image queue in small batches as they are rendered, not after the
whole file; text is chunked and goes to the model's text queue. A file that cannot be read fails
alone, with its message, and the other files of its upload go on. This module loads no model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from celery import shared_task

from common.contract import INDEX_CHUNKS_TASK, INDEX_PAGES_TASK, INGEST_TASK
from common.errors import EmbedqError
from common.inputs.documents import (
    chunk_text,
    convert_office_to_pdf,
    count_pdf_pages,
    decode_text,
    parse_jsonl,
    render_pdf_pages,
)
from common.inputs.images import encode_png, load_image
from common.inputs.kinds import detect_kind
from common.jobs.state import JobStore
from common.jobs.units import chunk_unit, page_unit

from .. import process

log = logging.getLogger(__name__)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@shared_task(name=INGEST_TASK, bind=True)
def ingest_file(self, *, job_id: str, index: int, collection: str, model: str, content_type: str | None = None) -> None:
    try:
        _ingest(job_id, index, collection, model, content_type)
    finally:
        process.current().ledger.done(job_id, self.request.id)


def _ingest(job_id: str, index: int, collection: str, model: str, content_type: str | None) -> None:
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
    try:
        kind = detect_kind(info["filename"], content_type, data[:8192])
        jobs.set_kind(job_id, index, kind)
        if kind == "office":
            data, kind = convert_office_to_pdf(data, info["filename"], settings.office_timeout_s), "pdf"
        if kind == "pdf":
            _queue_pdf(jobs, target, data)
        elif kind == "image":
            _queue_image(jobs, target, data)
        else:
            _queue_text(jobs, target, data, kind)
    except EmbedqError as exc:
        jobs.fail_file(job_id, index, exc.message)
    except Exception as exc:  # never leave a job waiting on a file that died here
        log.exception("ingesting %s of job %s failed", info["filename"], job_id)
        jobs.fail_file(job_id, index, f"internal error: {exc}")
    finally:
        jobs.drop_upload(job_id, index)


def _send(task: str, target: dict[str, Any], **kwargs: Any) -> None:
    process.current().ledger.send(target["job_id"], task, {**target, **kwargs})


def _skip_rest(jobs: JobStore, target: dict[str, Any], units: list[str]) -> None:
    jobs.record(target["job_id"], target["index"], "skipped", units)


def _queue_pdf(jobs: JobStore, target: dict[str, Any], data: bytes) -> None:
    job_id, index = target["job_id"], target["index"]
    settings = process.current().settings
    total = count_pdf_pages(data)
    jobs.set_total(job_id, index, total)
    pages = render_pdf_pages(data, settings.pdf_dpi(total), settings.max_image_pixels)
    for batch in _batches(pages, settings.ingest_pages_per_task):
        if jobs.is_cancelled(job_id):
            _skip_rest(jobs, target, [page_unit(index, page + 1) for page in range(batch[0][0], total)])
            return
        pages = [{"page": page + 1, "image": encode_png(image)} for page, image in batch]
        _send(INDEX_PAGES_TASK, target, pages=pages)


def _queue_image(jobs: JobStore, target: dict[str, Any], data: bytes) -> None:
    load_image(data, process.current().settings.max_image_pixels)  # refuse a bad image here, as its file's error
    jobs.set_total(target["job_id"], target["index"], 1)
    _send(INDEX_PAGES_TASK, target, pages=[{"page": 1, "image": data}])


def _queue_text(jobs: JobStore, target: dict[str, Any], data: bytes, kind: str) -> None:
    settings = process.current().settings
    if kind == "jsonl":
        records = [(r["id"], r["text"], {**target["metadata"], **r["metadata"]}) for r in parse_jsonl(data)]
    else:
        records = [(target["doc_id"], decode_text(data), target["metadata"])]
    chunks = [
        {"doc_id": doc_id, "chunk": number, "text": text, "metadata": metadata}
        for doc_id, body, metadata in records
        for number, text in enumerate(chunk_text(body, settings.chunk_size, settings.chunk_overlap))
    ]
    job_id, index = target["job_id"], target["index"]
    jobs.set_total(job_id, index, len(chunks))
    for start in range(0, len(chunks), settings.ingest_chunks_per_task):
        if jobs.is_cancelled(job_id):
            _skip_rest(jobs, target, [chunk_unit(index, c) for c in chunks[start:]])
            return
        _send(INDEX_CHUNKS_TASK, target, chunks=chunks[start : start + settings.ingest_chunks_per_task])
