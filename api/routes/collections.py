"""Collections (each bound to one served model), document uploads that start ingestion jobs,
document deletion, and search with exact MaxSim rerank for late-interaction collections."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile

from common.contract import INGEST_TASK
from common.errors import InvalidRequest, NotFound, UnsupportedMediaType
from common.inputs.kinds import detect_kind
from common.inputs.text import check_unicode
from common.jobs.state import UploadedFile
from common.store.limits import FILENAME_MAX, ID_MAX
from common.tenants import Principal

from ..deps import (
    BlobsDep,
    DispatcherDep,
    GoneDep,
    JobsDep,
    LazyStore,
    LedgerDep,
    PrincipalDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
)
from ..responses import json_response
from ..schemas import CollectionCreate, SearchRequest

router = APIRouter(prefix="/v1/collections", tags=["collections"])

PAGE_KINDS = {"pdf", "image", "office"}
TEXT_KINDS = {"text", "jsonl"}
PAGE_COLLECTIONS = ("multivector", "pages")


async def describe_collection(
    store: LazyStore, name: str, caller: Principal, with_count: bool = False
) -> dict[str, Any]:
    """The collection, if it exists and is the caller's to see: another tenant's is not found."""
    info = asdict(await store.call("describe", name)) if await store.call("has_collection", name) else None
    if info is None or not caller.owns(info["tenant"]):
        raise NotFound(f"No collection '{name}'.", "name")
    if with_count:
        info["count"] = await store.call("count", name)
    return {"object": "collection", **info}


@router.post("", status_code=201, summary="Create a collection bound to a served model")
async def create_collection(
    body: CollectionCreate, registry: RegistryDep, dispatcher: DispatcherDep, store: StoreDep, caller: PrincipalDep
) -> Response:
    spec = registry.get(body.model)
    if body.pool_factor is not None and not spec.multivector:
        raise InvalidRequest(
            f"pool_factor pools the token vectors of pages; '{spec.name}' gives one vector per page or chunk.",
            "pool_factor",
        )
    if await store.call("has_collection", body.name):  # names are one namespace, as S3's buckets
        raise InvalidRequest(f"A collection '{body.name}' already exists.", "name")
    # The model's own output says its width: no per-model dimension to keep in sync by hand.
    probe = await dispatcher.embed(spec.name, "text", [{"text": "dimension probe"}], output="pooled")
    kind = "multivector" if spec.multivector else "pages" if "image" in spec.modalities else "text"
    width = int(probe.arrays[0].shape[-1])
    await store.call("create_collection", body.name, kind, width, spec.name, body.pool_factor or 1, caller.tenant)
    return json_response(await describe_collection(store, body.name, caller, with_count=True), 201)


@router.get("", summary="List collections")
async def list_collections(store: StoreDep, caller: PrincipalDep) -> Response:
    infos = [info for info in await store.call("list_collections") if caller.owns(info.tenant)]
    return json_response({"object": "list", "data": [{"object": "collection", **asdict(info)} for info in infos]})


@router.get("/{name}", summary="Describe a collection, with its row count (pages or chunks)")
async def get_collection(name: str, store: StoreDep, caller: PrincipalDep) -> Response:
    return json_response(await describe_collection(store, name, caller, with_count=True))


@router.delete("/{name}", summary="Delete a collection: its vectors, document records and page images")
async def delete_collection(name: str, store: StoreDep, blobs: BlobsDep, caller: PrincipalDep) -> Response:
    await describe_collection(store, name, caller)
    await store.call("drop_collection", name)
    await asyncio.to_thread(blobs.delete_collection, name)
    return json_response({"id": name, "object": "collection", "deleted": True})


def image_url(collection: str, doc_id: str, page: int) -> str:
    """Where a page's full-size image is served (api.routes.documents; `?size=thumb` for its
    thumbnail), relative to the API."""
    return f"/v1/collections/{quote(collection, safe='')}/documents/{quote(doc_id, safe='')}/pages/{page}/image"


def _per_file_metadata(raw: str | None, filenames: list[str]) -> list[dict[str, Any]]:
    """`metadata`: a JSON list aligned with the files, or an object keyed by filename."""
    if not raw:
        return [{} for _ in filenames]
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"'metadata' is not valid JSON: {exc}", "metadata") from None
    check_unicode(parsed, "metadata")
    if isinstance(parsed, list) and len(parsed) == len(filenames) and all(isinstance(m, dict) for m in parsed):
        return parsed
    if isinstance(parsed, dict) and all(isinstance(m, dict) for m in parsed.values()):
        unknown = set(parsed) - set(filenames)
        if unknown:
            raise InvalidRequest(f"'metadata' names files that were not uploaded: {sorted(unknown)}", "metadata")
        return [parsed.get(name, {}) for name in filenames]
    raise InvalidRequest(
        "'metadata' must be a list of objects, one per file, or an object keyed by filename.", "metadata"
    )


def _check_file_fields(filename: str, doc_id: str, metadata: dict[str, Any], max_metadata_bytes: int) -> None:
    """Each field within what Milvus stores, before any work is queued."""
    for value, limit, param in ((filename, FILENAME_MAX, "files"), (doc_id, ID_MAX, "metadata")):
        if len(value.encode()) > limit:
            raise InvalidRequest(f"'{value[:40]}...' is over the limit of {limit} bytes.", param)
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > max_metadata_bytes:
        raise InvalidRequest(
            f"The metadata of '{filename}' is {size} bytes; the limit is {max_metadata_bytes} (EMBEDQ_MAX_METADATA_BYTES).",
            "metadata",
        )


def _check_kind(upload: UploadFile, data: bytes, collection: dict[str, Any]) -> None:
    kind = detect_kind(upload.filename, upload.content_type, data[:8192])
    allowed = TEXT_KINDS if collection["kind"] == "text" else PAGE_KINDS
    if kind not in allowed:
        raise UnsupportedMediaType(
            f"'{upload.filename}' is {kind}; collection '{collection['name']}' ({collection['kind']}) takes "
            f"{', '.join(sorted(allowed))}.",
            "files",
        )
    if kind == "office" and shutil.which("soffice") is None:
        raise UnsupportedMediaType(
            f"'{upload.filename}' needs LibreOffice (soffice) on the PATH to be converted.", "files"
        )


@router.post("/{name}/documents", status_code=202, summary="Upload files; returns a job to poll or stream")
async def upload_documents(
    name: str,
    request: Request,
    store: StoreDep,
    jobs: JobsDep,
    ledger: LedgerDep,
    settings: SettingsDep,
    caller: PrincipalDep,
) -> Response:
    collection = await describe_collection(store, name, caller)
    form = await request.form()
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not uploads:
        raise InvalidRequest("Send one or more files in the multipart field 'files'.", "files")
    if len(uploads) > settings.max_files_per_upload:
        raise InvalidRequest(f"At most {settings.max_files_per_upload} files per upload, not {len(uploads)}.", "files")
    metadata_field = form.get("metadata")
    check_unicode([u.filename or "" for u in uploads], "files")
    metadata = _per_file_metadata(
        metadata_field if isinstance(metadata_field, str) else None, [u.filename or "" for u in uploads]
    )
    files = []
    for upload, meta in zip(uploads, metadata):
        data = await upload.read()
        _check_kind(upload, data, collection)
        doc_id = str(meta.pop("doc_id", "")) or hashlib.sha256(data).hexdigest()[:16]
        filename = upload.filename or f"file{len(files)}"
        _check_file_fields(filename, doc_id, meta, settings.max_metadata_bytes)
        files.append(UploadedFile(filename, upload.content_type, data, meta, doc_id))
    job_id = await asyncio.to_thread(jobs.create, name, collection["model"], files, caller.tenant)
    for index, file in enumerate(files):
        await asyncio.to_thread(
            ledger.send,
            job_id,
            INGEST_TASK,
            {
                "job_id": job_id,
                "index": index,
                "collection": name,
                "model": collection["model"],
                "pool_factor": collection["pool_factor"],
                "content_type": file.content_type,
            },
        )
    return json_response(await asyncio.to_thread(jobs.get, job_id), 202)


@router.post("/{name}/search", summary="Search a collection (MaxSim rerank for page collections)")
async def search(
    name: str,
    body: SearchRequest,
    dispatcher: DispatcherDep,
    store: StoreDep,
    gone: GoneDep,
    settings: SettingsDep,
    caller: PrincipalDep,
) -> Response:
    for value, limit, param in (
        (body.query, settings.max_query_chars, "query"),
        (body.filter, settings.max_filter_chars, "filter"),
    ):
        if value and len(value) > limit:
            raise InvalidRequest(f"'{param}' has {len(value)} characters; the limit is {limit}.", param)
    collection = await describe_collection(store, name, caller)
    model = collection["model"]
    query = [{"text": body.query}]
    if collection["kind"] == "multivector":
        result = await dispatcher.embed(model, "text", query, gone, output="multivector", input_type="query")
        hits = await dispatcher.search_pages(name, result.arrays[0], body.top_k, body.filter, gone, caller.scope)
    else:
        result = await dispatcher.embed(model, "text", query, gone, output="pooled", input_type="query", normalize=True)
        if collection["kind"] == "pages":
            hits = await store.call("search_page_vectors", name, result.arrays[0], body.top_k, body.filter)
        else:
            found = await store.call("search_text", name, result.arrays[0], body.top_k, body.filter)
            hits = [asdict(hit) for hit in found]
    if collection["kind"] in PAGE_COLLECTIONS:
        hits = [{**hit, "image_url": image_url(name, hit["doc_id"], hit["page"])} for hit in hits]
    tokens = sum(result.tokens)
    return json_response(
        {"object": "list", "data": hits, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )
