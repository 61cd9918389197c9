"""The Milvus store against a real Milvus Lite server (started by `common.launch.milvus_lite`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.errors import InvalidRequest, NotFound
from common.launch import procs
from common.launch.milvus_lite import MilvusLiteServer
from common.store.milvus import ChunkRecord, MilvusStore, PageRecord

from .pages import DIM, make_pages, page_collection, unit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MilvusLiteServer(tmp_path_factory.mktemp("milvus") / "data", procs.free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def store(server):
    client = MilvusStore(server.uri)
    yield client
    client.close()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def pages_collection(store, rng):
    yield from page_collection(store, rng)


def test_second_server_on_the_same_data_dir_or_port_is_refused(server, tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        MilvusLiteServer(server.data_dir, procs.free_port()).start(timeout=30)
    with pytest.raises(RuntimeError, match="already in use"):
        MilvusLiteServer(tmp_path / "other", server.port).start()


def test_create_describe_list_drop(store):
    info = store.create_collection("texts", "text", 384, "minilm")
    assert (info.kind, info.dim, info.model) == ("text", 384, "minilm")
    assert store.create_collection("texts", "text", 384, "minilm") == info  # same binding: a no-op
    with pytest.raises(InvalidRequest):
        store.create_collection("texts", "text", 384, "bge-small")
    store.create_collection("images", "multivector", DIM, "colqwen-test", pool_factor=3)
    described = store.describe("images", fresh=True)  # read back from Milvus' collection properties
    assert (described.kind, described.pool_factor) == ("multivector", 3)
    assert store.describe("texts", fresh=True).pool_factor == 1
    with pytest.raises(InvalidRequest):  # the same model, pooled otherwise: another binding
        store.create_collection("images", "multivector", DIM, "colqwen-test")
    assert {c.name for c in store.list_collections()} >= {"texts", "images"}
    assert store.has_collection("texts")
    store.drop_collection("texts")
    store.drop_collection("images")
    assert not store.has_collection("texts")
    with pytest.raises(NotFound):
        store.describe("texts")
    store.drop_collection("texts")  # dropping what is gone is fine


def test_concurrent_creates_agree(server):
    stores = [MilvusStore(server.uri) for _ in range(4)]
    with ThreadPoolExecutor(len(stores)) as pool:
        created = list(pool.map(lambda s: s.create_collection("raced", "multivector", DIM, "colqwen-test"), stores))
    assert len(set(created)) == 1 and stores[0].count("raced") == 0
    stores[0].drop_collection("raced")
    for store in stores:
        store.close()


def test_data_survives_a_restart(tmp_path, rng):
    pages = make_pages(rng, 2)
    with MilvusLiteServer(tmp_path / "data", procs.free_port()) as first:
        store = MilvusStore(first.uri)
        store.create_collection("kept", "multivector", DIM, "colqwen-test")
        store.upsert_pages("kept", pages)  # not flushed: the server's write-ahead log keeps it
        store.close()
    with MilvusLiteServer(tmp_path / "data", procs.free_port()) as second:
        store = MilvusStore(second.uri)
        assert store.count("kept") == 6
        [page] = store.fetch_pages("kept", [pages[4].key])
        np.testing.assert_array_equal(page.vectors, pages[4].vectors)
        store.close()


def test_reupserting_pages_duplicates_nothing(store, pages_collection, rng):
    assert store.count("pages") == 60
    new_vectors = unit(rng.standard_normal((50, DIM))).astype(np.float16)
    changed = PageRecord(**{**vars(pages_collection[0]), "vectors": new_vectors})
    store.upsert_pages("pages", [changed, *pages_collection[1:10]])  # a redelivered batch
    store.flush("pages")
    assert store.count("pages") == 60
    [page] = store.fetch_pages("pages", [changed.key])
    np.testing.assert_array_equal(page.vectors, new_vectors)


def test_pages_read_back_whole(store, pages_collection):
    wanted = [pages_collection[i] for i in (5, 0, 42)]
    found = {p.key: p for p in store.fetch_pages("pages", [p.key for p in wanted] + ["doc-99#0"])}
    assert set(found) == {p.key for p in wanted}
    for page in wanted:
        got = found[page.key]
        assert (got.doc_id, got.page, got.filename, got.metadata) == (
            page.doc_id,
            page.page,
            page.filename,
            page.metadata,
        )
        np.testing.assert_array_equal(got.vectors, page.vectors)
    every = [p for batch in store.iter_pages("pages", batch=7) for p in batch]
    assert sorted(p.key for p in every) == sorted(p.key for p in pages_collection)
    assert store.matching_keys("pages", 'metadata["year"] < 2002 and page == 1') == {"doc-0#1", "doc-1#1"}


def test_delete_document(store, pages_collection):
    store.delete_document("pages", "doc-3")
    store.delete_document("pages", "no-such-doc")
    assert store.count("pages") == 57
    assert store.fetch_pages("pages", ["doc-3#0", "doc-3#1", "doc-3#2"]) == []


def test_text_chunks(store, rng):
    store.create_collection("chunks", "text", 64, "minilm")
    vectors = unit(rng.standard_normal((30, 64)))
    chunks = [
        ChunkRecord(f"note-{i // 10}", i % 10, f"note-{i // 10}.txt", f"chunk text {i}", {"i": i}, vectors[i])
        for i in range(30)
    ]
    store.upsert_chunks("chunks", chunks)
    store.upsert_chunks("chunks", chunks[:10])
    assert store.count("chunks") == 30
    hits = store.search_text("chunks", vectors[17] + 0.1 * unit(rng.standard_normal(64)), top_k=3)
    top = hits[0]
    assert (top.doc_id, top.chunk, top.text, top.metadata) == ("note-1", 7, "chunk text 17", {"i": 17})
    assert 0.9 < hits[0].score <= 1.0 + 1e-6 and hits[0].score > hits[1].score
    hits = store.search_text("chunks", vectors[17], top_k=30, filter='doc_id != "note-1" and metadata["i"] < 25')
    assert {h.doc_id for h in hits} == {"note-0", "note-2"} and len(hits) == 15
    store.delete_document("chunks", "note-0")
    assert store.count("chunks") == 20
    store.drop_collection("chunks")


def test_bad_input_is_refused(store, pages_collection, rng):
    with pytest.raises(InvalidRequest):
        store.upsert_pages("pages", [PageRecord("d", 0, "f", {}, rng.standard_normal((3, DIM // 2)))])
    with pytest.raises(InvalidRequest):
        store.upsert_pages("pages", [PageRecord("d", 0, "f", {}, np.full((3, DIM), np.nan))])
    with pytest.raises(InvalidRequest):
        store.upsert_chunks("pages", [ChunkRecord("d", 0, "f", "t", {}, np.ones(DIM))])
    with pytest.raises(NotFound):
        store.search_text("no-such-collection", np.ones(DIM))
