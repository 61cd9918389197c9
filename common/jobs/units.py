"""The ids of the units a job counts once each: a page of a file, a chunk of a document."""

from __future__ import annotations

from typing import Any


def page_unit(index: int, page: int) -> str:
    """Page `page` (counted from 1) of the job's file `index`."""
    return f"{index}:{page}"


def chunk_unit(index: int, chunk: dict[str, Any]) -> str:
    """A chunk (`{"doc_id", "chunk", ...}`) of the job's file `index`."""
    return f"{index}:{chunk['doc_id']}:{chunk['chunk']}"
