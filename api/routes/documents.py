"""A collection's documents: their listing, one document's deletion (vectors, record and page
images), and the kept page images (common.store.blobs) that page search hits point to by
`image_url` (api.routes.collections)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

from fastapi import APIRouter, Header, Query, Response

from common.errors import NotFound
from common.store.blobs import page_image_key

from ..deps import BlobsDep, PrincipalDep, StoreDep
from ..responses import json_response
from .collections import PAGE_COLLECTIONS, describe_collection

router = APIRouter(prefix="/v1/collections", tags=["documents"])


@router.get("/{name}/documents", summary="List a collection's documents")
async def list_documents(name: str, store: StoreDep, blobs: BlobsDep, caller: PrincipalDep) -> Response:
    await describe_collection(store, name, caller)
    records = await asyncio.to_thread(blobs.documents, name)
    return json_response({"object": "list", "data": [{"object": "document", **record} for record in records]})


@router.delete(
    "/{name}/documents/{doc_id:path}", summary="Delete one document: its pages or chunks, and its page images"
)
async def delete_document(name: str, doc_id: str, store: StoreDep, blobs: BlobsDep, caller: PrincipalDep) -> Response:
    await describe_collection(store, name, caller)
    await store.call("delete_document", name, doc_id)
    await asyncio.to_thread(blobs.delete_document, name, doc_id)
    return json_response({"id": doc_id, "object": "document", "deleted": True})


@router.get(
    "/{name}/documents/{doc_id:path}/pages/{page}/image",
    summary="A page's image, full size or thumbnail (JPEG), with an ETag",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "Not modified (If-None-Match)"}},
)
async def page_image(
    name: str,
    doc_id: str,
    page: int,
    store: StoreDep,
    blobs: BlobsDep,
    caller: PrincipalDep,
    size: Literal["thumb", "full"] = Query(default="full"),
    if_none_match: str | None = Header(default=None),
) -> Response:
    collection = await describe_collection(store, name, caller)
    if collection["kind"] not in PAGE_COLLECTIONS:
        raise NotFound(f"Collection '{name}' holds text chunks, not pages.", "name")
    data = await asyncio.to_thread(blobs.get, page_image_key(name, doc_id, page, size))
    if data is None:
        raise NotFound(f"No page {page} of document '{doc_id}' in '{name}'.", "page")
    # Revalidated on every use (no-cache): a page can be deleted or uploaded again under its doc_id.
    headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"', "Cache-Control": "private, no-cache"}
    if if_none_match and headers["ETag"] in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/jpeg", headers=headers)
