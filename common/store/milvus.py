"""The vector store: embedq's collections in Milvus (a Milvus Lite server by default, or any Milvus).

Each collection is bound to one served model (its name, kind, dimension and, for pages, token
pool factor are collection properties) and is of one of three kinds:

* ``text``: one row per chunk with its vector, searched by COSINE on an HNSW index.
* ``pages`` (single-vector visual models, the Bi* family): one row per page with its vector,
  searched by Milvus alike.
* ``multivector`` (late interaction): one row per page, holding the page's token vectors as
  float16 bytes, base64 in an ARRAY of VARCHAR parts (each part under Milvus' 65,535-byte VARCHAR
  limit), and its mean token vector in ``vector`` (Milvus wants a vector field in every
  collection; embedq does not search it). Search workers keep every page in memory and score
  them all (workers.search); Milvus is where pages are kept, filtered and read back whole.
  Every page write, document delete and drop is also told to the collection's change feed
  (store.changes), so those copies follow.

Why not one row per token vector (the Milvus bootcamp recipe): milvus-lite's search cost grows with
the rows stored, whatever the index (per-row bookkeeping in Python): a 20-token query took 0.5 s
at 200k rows, and 10k pages of 736 tokens make 7.4 M. Figures: ``scripts/bench_store.py``.

Writes are idempotent: primary keys are ``{doc_id}#{page}`` / ``{doc_id}#{chunk}``, written with
upsert, so a redelivered batch replaces its rows. Writes do not flush: Milvus seals a segment per
flush (many small segments slow every search, and Milvus rate-limits flushes), so the writer calls
``flush`` once a job's writes are done. Until then Milvus searches a text job's chunks by brute
force (page rows are read, not searched, by Milvus).
"""

from __future__ import annotations

import binascii
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient, MilvusException
from pymilvus.milvus_client import IndexParams

from ..errors import InvalidRequest, NotFound
from .changes import PageChanges
from .limits import FILENAME_MAX, ID_MAX, VARCHAR_MAX

if TYPE_CHECKING:
    from ..settings import Settings

Kind = Literal["multivector", "pages", "text"]

# milvus-lite gives query iterators no MVCC timestamp, so pymilvus warns on each one that it uses
# the client's clock instead: the same "everything written so far" that Strong consistency reads.
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

PART_BYTES = VARCHAR_MAX // 4 * 3  # raw bytes whose base64 fits one VARCHAR
MAX_PARTS = 64  # 3.1 MB of float16 per page: 12,288 tokens of dim 128
PARTITIONS = 16  # partitions keyed by doc_id, see create_collection
WRITE_BATCH = 32  # rows per upsert call: 32 pages are about 10 MB on the wire
TIMEOUT_S = 60.0
NOT_LOADED = 101  # Milvus' error code for a collection that is not loaded
OUTAGE_FIRST_DELAY_S = 0.5
OUTAGE_MAX_DELAY_S = 8.0

log = logging.getLogger(__name__)


def _unreachable(exc: MilvusException) -> bool:
    """Whether the error says Milvus could not be reached (down, restarting), rather than refused."""
    text = str(exc.message)
    return "Fail connecting" in text or "UNAVAILABLE" in text or "Connection refused" in text


def page_key(doc_id: str, page: int) -> str:
    """A page's primary key (a chunk's is alike)."""
    return f"{doc_id}#{page}"


@dataclass
class PageRecord:
    doc_id: str
    page: int
    filename: str
    metadata: dict
    vectors: np.ndarray  # (n_tokens, dim), float16 or float32

    @property
    def key(self) -> str:
        return page_key(self.doc_id, self.page)


@dataclass
class ChunkRecord:
    doc_id: str
    chunk: int
    filename: str
    text: str
    metadata: dict
    vector: np.ndarray  # (dim,)


@dataclass
class Hit:
    """A text chunk found by search (page hits come from the search workers)."""

    doc_id: str
    filename: str
    score: float
    metadata: dict
    chunk: int
    text: str


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    kind: Kind
    model: str
    dim: int
    pool_factor: int = 1  # pages: their token vectors are stored pooled by this factor (1: not pooled)
    tenant: str = ""  # who owns it (common.tenants); "": the shared tenant


PAGE_FIELDS = ["doc_id", "page", "filename", "metadata", "n_tokens", "tokens"]


def _pages(entities: list[dict]) -> list[PageRecord]:
    """Page rows, read with PAGE_FIELDS, as records with their float16 token vectors."""
    return [
        PageRecord(
            e["doc_id"],
            e["page"],
            e["filename"],
            e["metadata"],
            np.frombuffer(b"".join(map(binascii.a2b_base64, e["tokens"])), "<f2").reshape(e["n_tokens"], -1),
        )
        for e in entities
    ]


def _info(name: str, properties: dict[str, str]) -> CollectionInfo:
    return CollectionInfo(
        name,
        properties["embedq.kind"],
        properties["embedq.model"],
        int(properties["embedq.dim"]),
        int(properties.get("embedq.pool_factor", "1")),  # collections made before pooling: 1
        properties.get("embedq.tenant", ""),  # collections made before tenants: the shared one
    )


def _layout(kind: Kind, dim: int) -> tuple[CollectionSchema, IndexParams]:
    """Schema and indexes of a collection of `kind`."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=ID_MAX + 24)
    # doc_id as partition key: milvus-lite compacts each partition apart and fails to merge
    # segments whose VARCHAR data passes 2 GiB (an Arrow limit; about 8,500 pages of 736 tokens).
    schema.add_field("doc_id", DataType.VARCHAR, max_length=ID_MAX, is_partition_key=True)
    schema.add_field("filename", DataType.VARCHAR, max_length=FILENAME_MAX)
    schema.add_field("metadata", DataType.JSON)
    index = MilvusClient.prepare_index_params()
    index.add_index("doc_id", index_type="INVERTED")
    if kind == "pages":
        schema.add_field("page", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index.add_index("vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
        return schema, index
    if kind == "text":
        schema.add_field("chunk", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=VARCHAR_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index.add_index("vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
        return schema, index
    if kind == "multivector":
        schema.add_field("page", DataType.INT64)
        schema.add_field("n_tokens", DataType.INT64)
        schema.add_field(
            "tokens", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_PARTS, max_length=VARCHAR_MAX
        )
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        # The cheapest index to keep (a collection must have one to load); nlist twice: milvus-lite
        # reads only the nested "params" (pymilvus 3 sends them flat), Milvus reads both.
        index.add_index("vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": 1, "params": {"nlist": 1}})
        return schema, index
    raise InvalidRequest(f"unknown collection kind {kind!r}", param="kind")


def _check_size(value: str, limit: int, name: str) -> None:
    if len(value.encode()) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} bytes", param=name)


class MilvusStore:
    """embedq's collections in the Milvus at `uri` (synchronous pymilvus client)."""

    def __init__(self, uri: str, token: str = "", changes: PageChanges | None = None, outage_s: float = 0.0):
        """`outage_s`: how long a write waits out a Milvus that cannot be reached (workers: a
        restart in the middle of a job), trying again with backoff; 0: it fails at once."""
        self.changes = changes  # told of every page write, delete and drop; None: nobody searches pages
        self._outage_s = outage_s
        # Keepalive pings no more often than gRPC servers accept by default (every 5 min while
        # idle); pymilvus' 10 s makes the Milvus Lite server drop the connection (GOAWAY).
        self.client = MilvusClient(
            uri=uri, token=token, timeout=TIMEOUT_S, grpc_options={"grpc.keepalive_time_ms": 310_000}
        )
        # Descriptions read here, so that a write or a search does not ask Milvus again; dropped on
        # a drop made here, and on a write that fails (another process may have dropped it).
        self._described: dict[str, CollectionInfo] = {}

    @classmethod
    def connect(cls, settings: Settings, changes: PageChanges | None = None, outage_s: float = 0.0) -> MilvusStore:
        """The store as every embedq process opens it: EMBEDQ_MILVUS_URI, with EMBEDQ_MILVUS_TOKEN."""
        return cls(settings.milvus_uri, settings.milvus_token, changes, outage_s)

    def close(self) -> None:
        self.client.close()

    # Collections

    def create_collection(
        self, name: str, kind: Kind, dim: int, model: str, pool_factor: int = 1, tenant: str = ""
    ) -> CollectionInfo:
        """Create `name` bound to `model` (and, for pages, to a token `pool_factor`, which its
        writers apply), owned by `tenant`; a no-op when it exists with the same binding."""
        wanted = CollectionInfo(name, kind, model, dim, pool_factor, tenant)
        self._described.pop(name, None)
        if not self.client.has_collection(name):
            schema, index = _layout(kind, dim)
            properties = {
                "embedq.kind": kind,
                "embedq.model": model,
                "embedq.dim": str(dim),
                "embedq.pool_factor": str(pool_factor),
                "embedq.tenant": tenant,
            }
            try:
                self.client.create_collection(
                    name,
                    schema=schema,
                    index_params=index,
                    num_partitions=PARTITIONS,
                    consistency_level="Strong",
                    properties=properties,
                )
                self._described[name] = wanted
                return wanted
            except MilvusException:
                if not self.client.has_collection(name):
                    raise
                # Another process created it at the same moment: its binding must match ours.
        found = self.describe(name)
        if found != wanted:
            raise InvalidRequest(f"collection {name!r} exists as {found}", param="collection")
        return found

    def _properties(self, name: str) -> dict[str, str]:
        if not self.client.has_collection(name):
            raise NotFound(f"no collection {name!r}", param="collection")
        properties = self.client.describe_collection(name).get("properties", {})
        if "embedq.kind" not in properties:
            raise NotFound(f"{name!r} is not an embedq collection", param="collection")
        return properties

    def describe(self, name: str, fresh: bool = False) -> CollectionInfo:
        """The collection's binding, as read before unless `fresh`; NotFound when there is none."""
        if fresh:
            self._described.pop(name, None)
        if name not in self._described:
            self._described[name] = _info(name, self._properties(name))
        return self._described[name]

    def list_collections(self) -> list[CollectionInfo]:
        """embedq's collections; others that share the Milvus are left out."""
        found = []
        for name in self.client.list_collections():
            try:
                found.append(self.describe(name))
            except NotFound:
                continue
        return found

    def has_collection(self, name: str) -> bool:
        return self.client.has_collection(name)

    def drop_collection(self, name: str) -> None:
        self._described.pop(name, None)
        if self.client.has_collection(name):
            self.client.drop_collection(name)
            if self.changes:
                self.changes.dropped(name)

    def flush(self, name: str) -> None:
        self._riding_out(self.client.flush, name)

    def _riding_out(self, call: Callable, *args: Any) -> Any:
        """`call(*args)`, tried again while Milvus cannot be reached, for up to `outage_s`."""
        deadline, delay = time.monotonic() + self._outage_s, OUTAGE_FIRST_DELAY_S
        while True:
            try:
                return call(*args)
            except MilvusException as exc:
                if not _unreachable(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("Milvus is not reachable (%s); trying again in %.1fs", exc.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, OUTAGE_MAX_DELAY_S)

    def count(self, name: str) -> int:
        return int(self._loaded(name, self.client.query, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def delete_document(self, name: str, doc_id: str) -> None:
        """Delete every page or chunk of `doc_id` (nothing when there is none)."""
        self._loaded(name, self.client.delete, filter=f"doc_id == {json.dumps(doc_id, ensure_ascii=False)}")
        if self.changes:
            self.changes.deleted(name, doc_id)

    def _loaded(self, name: str, call, **kwargs):
        """`call(name, **kwargs)`, loading the collection first if the server has it released (as
        milvus-lite leaves every collection after a restart)."""
        try:
            return call(name, **kwargs)
        except MilvusException as exc:
            if exc.code != NOT_LOADED:
                raise
        self.client.load_collection(name)
        return call(name, **kwargs)

    # Writes

    def _expect(self, name: str, *kinds: Kind) -> CollectionInfo:
        info = self.describe(name)
        if info.kind not in kinds:
            raise InvalidRequest(
                f"collection {name!r} holds {info.kind} vectors, not {' or '.join(kinds)}", param="collection"
            )
        return info

    def _write(
        self, name: str, kinds: tuple[Kind, ...], rows_for: Callable[[CollectionInfo], list[dict]]
    ) -> list[dict]:
        """Upsert the rows `rows_for` builds for the collection's description, riding out an
        outage of up to `outage_s`."""
        return self._riding_out(self._write_once, name, kinds, rows_for)

    def _write_once(
        self, name: str, kinds: tuple[Kind, ...], rows_for: Callable[[CollectionInfo], list[dict]]
    ) -> list[dict]:
        """A write that fails is tried once more on a fresh description: the one read before may be
        of a collection dropped (and made again) since."""
        for attempt in range(2):
            rows = rows_for(self._expect(name, *kinds))
            try:
                for start in range(0, len(rows), WRITE_BATCH):
                    self.client.upsert(name, rows[start : start + WRITE_BATCH])
                return rows
            except MilvusException:
                if attempt or self._described.pop(name, None) is None:
                    raise
        raise AssertionError("unreachable")

    def _vectors(self, array: np.ndarray, dim: int, rows: bool, what: str) -> np.ndarray:
        """`array`, checked to hold finite numbers in shape (n, dim) if `rows` else (dim,)."""
        array = np.asarray(array)
        if array.ndim != 1 + rows or array.shape[-1] != dim or array.size == 0 or not np.isfinite(array).all():
            shape = f"(n, {dim})" if rows else f"({dim},)"
            raise InvalidRequest(f"{what} must be finite numbers in shape {shape}, not {array.shape}", param=what)
        return array

    def _common_fields(self, doc_id: str, index: int, filename: str, metadata: dict) -> dict:
        _check_size(doc_id, ID_MAX, "doc_id")
        _check_size(filename, FILENAME_MAX, "filename")
        return {"pk": page_key(doc_id, index), "doc_id": doc_id, "filename": filename, "metadata": metadata}

    def upsert_pages(self, name: str, pages: list[PageRecord]) -> None:
        """Store pages: their token vectors (`(n, dim)`) in a multivector collection, or one vector
        (`(dim,)`) each in a pages collection."""

        def rows_for(info: CollectionInfo) -> list[dict]:
            if info.kind == "pages":
                return [
                    self._common_fields(page.doc_id, page.page, page.filename, page.metadata)
                    | {"page": page.page, "vector": self._vectors(page.vectors, info.dim, False, "vector")}
                    for page in pages
                ]
            rows = []
            for page in pages:
                tokens = self._vectors(page.vectors, info.dim, True, "vectors").astype("<f2")
                raw = tokens.tobytes()
                parts = [
                    binascii.b2a_base64(raw[i : i + PART_BYTES], newline=False).decode()
                    for i in range(0, len(raw), PART_BYTES)
                ]
                if len(parts) > MAX_PARTS:
                    raise InvalidRequest(
                        f"page {page.page} of {page.doc_id!r} has too many tokens ({len(tokens)})", param="vectors"
                    )
                rows.append(
                    self._common_fields(page.doc_id, page.page, page.filename, page.metadata)
                    | {
                        "page": page.page,
                        "n_tokens": len(tokens),
                        "tokens": parts,
                        "vector": tokens.astype(np.float32).mean(axis=0),
                    }
                )
            return rows

        rows = self._write(name, ("multivector", "pages"), rows_for)
        if self.changes and self.describe(name).kind == "multivector":  # only page copies follow a feed
            self.changes.upserted(name, [row["pk"] for row in rows])

    def upsert_chunks(self, name: str, chunks: list[ChunkRecord]) -> None:
        def rows_for(info: CollectionInfo) -> list[dict]:
            rows = []
            for chunk in chunks:
                _check_size(chunk.text, VARCHAR_MAX, "text")
                vector = self._vectors(chunk.vector, info.dim, False, "vector").astype(np.float32)
                rows.append(
                    self._common_fields(chunk.doc_id, chunk.chunk, chunk.filename, chunk.metadata)
                    | {"chunk": chunk.chunk, "text": chunk.text, "vector": vector}
                )
            return rows

        self._write(name, ("text",), rows_for)

    # Reads of pages (for the search workers' copies) and searches of chunks

    def fetch_pages(self, name: str, keys: list[str]) -> list[PageRecord]:
        """The pages of multi-vector collection `name` stored under `keys` (primary keys), in one
        call; keys with no page are left out."""
        return _pages(self._loaded(name, self.client.get, ids=keys, output_fields=PAGE_FIELDS) if keys else [])

    def iter_pages(self, name: str, batch: int = 64) -> Iterator[list[PageRecord]]:
        """Every page of `name`, `batch` at a time."""
        self._expect(name, "multivector")
        iterator = self._loaded(
            name, self.client.query_iterator, batch_size=batch, filter="", output_fields=PAGE_FIELDS
        )
        try:
            while found := iterator.next():
                yield _pages(found)
        finally:
            iterator.close()

    def matching_keys(self, name: str, filter: str) -> set[str]:
        """The primary keys of the rows that pass `filter` (a Milvus boolean expression)."""
        try:
            iterator = self._loaded(
                name, self.client.query_iterator, batch_size=4096, filter=filter, output_fields=["pk"]
            )
        except MilvusException as exc:
            raise InvalidRequest(f"bad filter: {exc.message}", param="filter") from None
        keys: set[str] = set()
        try:
            while found := iterator.next():
                keys.update(row["pk"] for row in found)
        finally:
            iterator.close()
        return keys

    def _search(
        self, name: str, kind: Kind, vector: np.ndarray, top_k: int, filter: str | None, fields: list[str]
    ) -> list[dict]:
        """Milvus' HNSW search of a one-vector-per-row collection: its hits, best first."""
        info = self._expect(name, kind)
        vector = self._vectors(vector, info.dim, False, "vector").astype(np.float32)
        return self._loaded(
            name,
            self.client.search,
            data=[vector],
            anns_field="vector",
            limit=top_k,
            filter=filter or "",
            output_fields=fields,
            search_params={"metric_type": "COSINE", "params": {"ef": max(64, top_k)}},
        )[0]

    def search_page_vectors(
        self, name: str, vector: np.ndarray, top_k: int = 10, filter: str | None = None
    ) -> list[dict]:
        """The best pages of a pages collection: `[{doc_id, filename, page, score, metadata}]`."""
        fields = ["doc_id", "page", "filename", "metadata"]
        found = self._search(name, "pages", vector, top_k, filter, fields)
        return [{**{key: h["entity"][key] for key in fields}, "score": float(h["distance"])} for h in found]

    def search_text(self, name: str, vector: np.ndarray, top_k: int = 10, filter: str | None = None) -> list[Hit]:
        found = self._search(name, "text", vector, top_k, filter, ["doc_id", "chunk", "filename", "metadata", "text"])
        return [
            Hit(
                doc_id=e["doc_id"],
                filename=e["filename"],
                score=float(h["distance"]),
                metadata=e["metadata"],
                chunk=e["chunk"],
                text=e["text"],
            )
            for h in found
            for e in [h["entity"]]
        ]
