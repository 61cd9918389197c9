"""The vector store: embedq's collections in Milvus (a Milvus Lite server by default, or any Milvus).

Each collection is bound to one served model (its name, kind and dimension are collection
properties) and is of one of two kinds:

* ``text``: one row per chunk with its vector, searched by COSINE on an HNSW index.
* ``multivector`` (late interaction): one row per page, holding
  - the page's token vectors as float16 bytes, base64 in an ARRAY of VARCHAR parts, each part under
    Milvus' 65,535-byte VARCHAR limit; the exact MaxSim rerank reads them, and
  - a fixed dimensional encoding (FDE, after MUVERA: Dhulipala et al., 2024) of the token set in
    ``vector``: one 16,384-d vector per page whose inner product with the query's FDE approximates
    the MaxSim score.
  A search takes the top candidates by FDE inner product (one Milvus search, which returns the
  candidates' token bytes with them) and reranks them by exact MaxSim in NumPy.

Why one row per page: milvus-lite's search cost grows with the rows stored, whatever the index
(per-row bookkeeping in Python): with one row per token vector, a 20-token query took 0.5 s at
200k rows (270 pages of 736 tokens). With page rows, a search at 10k pages costs about 45 ms
for the candidates plus about 2 ms per candidate reranked (moving 250 KB through the server):
p50 87 ms with the default 16 candidates on 2 cores. Figures: ``scripts/bench_store.py``.

Writes are idempotent: primary keys are ``{doc_id}#{page}`` / ``{doc_id}#{chunk}``, written with
upsert, so a redelivered batch replaces its rows. Writes do not flush: Milvus seals a segment per
flush (many small segments slow every search, and Milvus rate-limits flushes), so the writer calls
``flush`` once a job's writes are done. Until then its rows are searched by brute force: cheap for
page rows (milvus-lite flushes by itself every 128 MB, about 400 pages), not for a large text job.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient, MilvusException
from pymilvus.milvus_client import IndexParams

from common.errors import InvalidRequest, NotFound

Kind = Literal["multivector", "text"]

VARCHAR_MAX = 65_535  # Milvus' limit for one VARCHAR value, in bytes
PART_BYTES = VARCHAR_MAX // 4 * 3  # raw bytes whose base64 fits one VARCHAR
MAX_PARTS = 64  # 3.1 MB of float16 per page: 12,288 tokens of dim 128
ID_MAX = 512
FILENAME_MAX = 1024
FDE_DIM = 16_384
FDE_BITS = 4
PARTITIONS = 16  # partitions keyed by doc_id, see create_collection
CANDIDATES = 16  # pages reranked by exact MaxSim per multi-vector search (at least top_k); ~2 ms each
WRITE_BATCH = 32  # rows per upsert call: 32 pages are about 10 MB on the wire
TIMEOUT_S = 60.0
NOT_LOADED = 101  # Milvus' error code for a collection that is not loaded


@dataclass
class PageRecord:
    doc_id: str
    page: int
    filename: str
    metadata: dict
    vectors: np.ndarray  # (n_tokens, dim), float16 or float32


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
    doc_id: str
    filename: str
    score: float
    metadata: dict
    page: int | None = None
    chunk: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    kind: Kind
    model: str
    dim: int


class Fde:
    """Fixed dimensional encoding of a set of token vectors.

    `reps` SimHash partitions of the token space into 2**bits buckets each. A page puts, per bucket,
    the mean of its tokens that hash there (an empty bucket takes the token nearest to it in Hamming
    distance); a query puts the sum of its tokens. So <query FDE, page FDE> adds up, over the
    repetitions, each query token's dot product with the mean of the page tokens hashed with it.
    """

    def __init__(self, dim: int, reps: int, bits: int, seed: int = 0):
        # ±1 hyperplanes drawn from SHAKE-256, so the encoding never changes with a NumPy release.
        count = dim * reps * bits
        stream = hashlib.shake_256(f"embedq-fde-{seed}".encode()).digest(count // 8 + 1)
        signs = np.unpackbits(np.frombuffer(stream, np.uint8))[:count]
        self.planes = (signs.astype(np.float32) * 2 - 1).reshape(dim, reps * bits)
        self.reps, self.bits = reps, bits
        self.spec = json.dumps({"reps": reps, "bits": bits, "seed": seed})

    @classmethod
    def for_dim(cls, dim: int) -> Fde:
        return cls(dim, max(1, FDE_DIM // (2**FDE_BITS * dim)), FDE_BITS)

    @classmethod
    def from_spec(cls, dim: int, spec: str) -> Fde:
        return cls(dim, **json.loads(spec))

    @property
    def size(self) -> int:
        return self.reps * 2**self.bits * self.planes.shape[0]

    def _buckets(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each token's bucket per repetition (n, reps), and the (reps, buckets, n) membership matrix."""
        n = len(tokens)
        bits = (tokens @ self.planes > 0).reshape(n, self.reps, self.bits)
        codes = bits @ (1 << np.arange(self.bits))
        members = np.zeros((self.reps, 2**self.bits, n), np.float32)
        members[np.arange(self.reps), codes, np.arange(n)[:, None]] = 1.0
        return codes, members

    def page(self, tokens: np.ndarray) -> np.ndarray:
        codes, members = self._buckets(tokens)
        sums = members @ tokens
        counts = members.sum(axis=-1)
        empty = counts == 0
        if empty.any():
            differing = (codes[:, :, None] ^ np.arange(2**self.bits)).astype(np.uint8)
            nearest = np.unpackbits(differing[..., None], axis=-1).sum(-1).argmin(axis=0)
            sums[empty] = tokens[nearest[empty]]
            counts[empty] = 1.0
        return (sums / counts[..., None]).ravel()

    def query(self, tokens: np.ndarray) -> np.ndarray:
        return (self._buckets(tokens)[1] @ tokens).ravel()


def maxsim(query: np.ndarray, tokens: np.ndarray, counts: list[int]) -> np.ndarray:
    """colpali-engine's score, in float32: per page (`counts` consecutive rows of `tokens`), the sum
    over query tokens of their best dot product with the page's tokens."""
    starts = np.cumsum([0, *counts[:-1]])
    return np.maximum.reduceat(query.astype(np.float32) @ tokens.astype(np.float32).T, starts, axis=1).sum(axis=0)


def _decode_tokens(entities: list[dict], dim: int) -> np.ndarray:
    """The pages' base64 parts, decoded into one (total tokens, dim) float16 array."""
    tokens = np.empty((sum(e["n_tokens"] for e in entities), dim), "<f2")
    buffer, offset = memoryview(tokens).cast("B"), 0
    for entity in entities:
        for part in entity["tokens"]:
            raw = binascii.a2b_base64(part)
            buffer[offset : offset + len(raw)] = raw
            offset += len(raw)
    return tokens


def _info(name: str, properties: dict[str, str]) -> CollectionInfo:
    return CollectionInfo(name, properties["embedq.kind"], properties["embedq.model"], int(properties["embedq.dim"]))


def _layout(kind: Kind, dim: int) -> tuple[CollectionSchema, IndexParams, dict[str, str]]:
    """Schema, indexes and extra properties of a collection of `kind`."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=ID_MAX + 24)
    # doc_id as partition key: milvus-lite compacts each partition apart and fails to merge
    # segments whose VARCHAR data passes 2 GiB (an Arrow limit; about 8,500 pages of 736 tokens).
    schema.add_field("doc_id", DataType.VARCHAR, max_length=ID_MAX, is_partition_key=True)
    schema.add_field("filename", DataType.VARCHAR, max_length=FILENAME_MAX)
    schema.add_field("metadata", DataType.JSON)
    index = MilvusClient.prepare_index_params()
    index.add_index("doc_id", index_type="INVERTED")
    if kind == "text":
        schema.add_field("chunk", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=VARCHAR_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index.add_index("vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
        return schema, index, {}
    if kind == "multivector":
        fde = Fde.for_dim(dim)
        schema.add_field("page", DataType.INT64)
        schema.add_field("n_tokens", DataType.INT64)
        schema.add_field("tokens", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_PARTS,
                         max_length=VARCHAR_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=fde.size)
        # An exact scan: FDEs of unrelated pages look like random vectors, on which HNSW found 39-72%
        # of the exact top 32 (ef 128-512, 10k pages). IVF_FLAT with one list, not FLAT: milvus-lite
        # runs FLAT by copying every stored vector on each search. nlist twice: milvus-lite reads
        # only the nested "params" (pymilvus 3 sends them flat), Milvus reads both.
        index.add_index("vector", index_type="IVF_FLAT", metric_type="IP",
                        params={"nlist": 1, "params": {"nlist": 1}})
        return schema, index, {"embedq.fde": fde.spec}
    raise InvalidRequest(f"unknown collection kind {kind!r}", param="kind")


def _check_size(value: str, limit: int, name: str) -> None:
    if len(value.encode()) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} bytes", param=name)


class MilvusStore:
    """embedq's collections in the Milvus at `uri` (synchronous pymilvus client)."""

    def __init__(self, uri: str, token: str = ""):
        # Keepalive pings no more often than gRPC servers accept by default (every 5 min while
        # idle); pymilvus' 10 s makes the Milvus Lite server drop the connection (GOAWAY).
        self.client = MilvusClient(uri=uri, token=token, timeout=TIMEOUT_S,
                                   grpc_options={"grpc.keepalive_time_ms": 310_000})

    def close(self) -> None:
        self.client.close()

    # Collections

    def create_collection(self, name: str, kind: Kind, dim: int, model: str) -> CollectionInfo:
        """Create `name` bound to `model`; a no-op when it exists with the same binding."""
        wanted = CollectionInfo(name, kind, model, dim)
        if not self.client.has_collection(name):
            schema, index, properties = _layout(kind, dim)
            properties |= {"embedq.kind": kind, "embedq.model": model, "embedq.dim": str(dim)}
            try:
                self.client.create_collection(name, schema=schema, index_params=index, num_partitions=PARTITIONS,
                                              consistency_level="Strong", properties=properties)
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

    def describe(self, name: str) -> CollectionInfo:
        return _info(name, self._properties(name))

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
        if self.client.has_collection(name):
            self.client.drop_collection(name)

    def flush(self, name: str) -> None:
        self.client.flush(name)

    def count(self, name: str) -> int:
        return int(self._loaded(name, self.client.query, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def delete_document(self, name: str, doc_id: str) -> None:
        """Delete every page or chunk of `doc_id` (nothing when there is none)."""
        self._loaded(name, self.client.delete, filter=f"doc_id == {json.dumps(doc_id, ensure_ascii=False)}")

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

    def _expect(self, name: str, kind: Kind) -> tuple[CollectionInfo, dict[str, str]]:
        properties = self._properties(name)
        info = _info(name, properties)
        if info.kind != kind:
            raise InvalidRequest(f"collection {name!r} holds {info.kind} vectors, not {kind}", param="collection")
        return info, properties

    def _upsert(self, name: str, rows: list[dict]) -> None:
        for start in range(0, len(rows), WRITE_BATCH):
            self.client.upsert(name, rows[start : start + WRITE_BATCH])

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
        return {"pk": f"{doc_id}#{index}", "doc_id": doc_id, "filename": filename, "metadata": metadata}

    def upsert_pages(self, name: str, pages: list[PageRecord]) -> None:
        info, properties = self._expect(name, "multivector")
        fde = Fde.from_spec(info.dim, properties["embedq.fde"])
        rows = []
        for page in pages:
            tokens = self._vectors(page.vectors, info.dim, True, "vectors").astype("<f2")
            raw = tokens.tobytes()
            parts = [binascii.b2a_base64(raw[i : i + PART_BYTES], newline=False).decode()
                     for i in range(0, len(raw), PART_BYTES)]
            if len(parts) > MAX_PARTS:
                raise InvalidRequest(f"page {page.page} of {page.doc_id!r} has too many tokens ({len(tokens)})",
                                     param="vectors")
            rows.append(self._common_fields(page.doc_id, page.page, page.filename, page.metadata) | {
                "page": page.page, "n_tokens": len(tokens), "tokens": parts,
                # The FDE of the float16 tokens, so candidates are ranked on what is stored.
                "vector": fde.page(tokens.astype(np.float32)),
            })
        self._upsert(name, rows)

    def upsert_chunks(self, name: str, chunks: list[ChunkRecord]) -> None:
        info, _ = self._expect(name, "text")
        rows = []
        for chunk in chunks:
            _check_size(chunk.text, VARCHAR_MAX, "text")
            vector = self._vectors(chunk.vector, info.dim, False, "vector").astype(np.float32)
            rows.append(self._common_fields(chunk.doc_id, chunk.chunk, chunk.filename, chunk.metadata)
                        | {"chunk": chunk.chunk, "text": chunk.text, "vector": vector})
        self._upsert(name, rows)

    # Searches

    def search_multivector(self, name: str, query: np.ndarray, top_k: int = 10, filter: str | None = None,
                           candidates: int = CANDIDATES) -> list[Hit]:
        """The `top_k` pages by exact MaxSim among the `candidates` best by FDE inner product."""
        info, properties = self._expect(name, "multivector")
        query = self._vectors(query, info.dim, True, "query").astype(np.float32)
        fde = Fde.from_spec(info.dim, properties["embedq.fde"])
        found = self._loaded(
            name, self.client.search, data=[fde.query(query)], anns_field="vector", limit=max(top_k, candidates),
            filter=filter or "", output_fields=["doc_id", "page", "filename", "metadata", "n_tokens", "tokens"],
            search_params={"metric_type": "IP", "params": {"nprobe": 1}},
        )[0]
        if not found:
            return []
        entities = [hit["entity"] for hit in found]
        scores = maxsim(query, _decode_tokens(entities, info.dim), [e["n_tokens"] for e in entities])
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [Hit(doc_id=entities[i]["doc_id"], filename=entities[i]["filename"], score=float(scores[i]),
                    metadata=entities[i]["metadata"], page=entities[i]["page"]) for i in best]

    def search_text(self, name: str, vector: np.ndarray, top_k: int = 10, filter: str | None = None) -> list[Hit]:
        info, _ = self._expect(name, "text")
        vector = self._vectors(vector, info.dim, False, "vector").astype(np.float32)
        found = self._loaded(
            name, self.client.search, data=[vector], anns_field="vector", limit=top_k, filter=filter or "",
            output_fields=["doc_id", "chunk", "filename", "metadata", "text"],
            search_params={"metric_type": "COSINE", "params": {"ef": max(64, top_k)}},
        )[0]
        return [Hit(doc_id=e["doc_id"], filename=e["filename"], score=float(h["distance"]), metadata=e["metadata"],
                    chunk=e["chunk"], text=e["text"]) for h in found for e in [h["entity"]]]
