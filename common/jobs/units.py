"""The ids of the units a job counts once each: a page of a file, a chunk of a document."""

from __future__ import annotations

from typing import Any

from ..contract import INDEX_CHUNKS_TASK, INDEX_PAGES_TASK


def page_unit(index: int, page: int) -> str:
    """Page `page` (counted from 1) of the job's file `index`."""
    return f"{index}:{page}"


def chunk_unit(index: int, chunk: dict[str, Any]) -> str:
    """A chunk (`{"doc_id", "chunk", ...}`) of the job's file `index`."""
    return f"{index}:{chunk['doc_id']}:{chunk['chunk']}"


def task_units(name: str, kwargs: dict[str, Any]) -> list[str]:
    """The units a job task counts: its pages or chunks (none for a file's ingestion task)."""
    if name == INDEX_PAGES_TASK:
        return [page_unit(kwargs["index"], page["page"]) for page in kwargs["pages"]]
    if name == INDEX_CHUNKS_TASK:
        return [chunk_unit(kwargs["index"], chunk) for chunk in kwargs["chunks"]]
    return []
