"""Page search as the search worker runs it: every page scored in memory, the best exactly, against the
session's real Milvus Lite server and a real Redis change feed; writes from another store show up."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

from common import keys
from common.errors import InvalidRequest, NotFound
from common.shards import owners, shard_of
from common.store.changes import PageChanges
from common.store.milvus import MilvusStore, PageRecord
from workers.search import kernels
from workers.search.scan import EXTRA, Int8Pages, OverBudget, Searcher

from .pages import DIM, make_pages, page_collection, unit


def reference_scores(query: np.ndarray, pages: list[PageRecord]) -> np.ndarray:
    """colpali-engine's MaxSim (batch_size 1: it pads a batch's pages with zero rows)."""
    return BaseVisualRetrieverProcessor.score_multi_vector(
        [torch.from_numpy(query.astype(np.float32))],
        [torch.from_numpy(p.vectors.astype(np.float32)) for p in pages],
        batch_size=1,
        device="cpu",
    )[0].numpy()


def query_from(page: PageRecord, rng: np.random.Generator, tokens: int = 20) -> np.ndarray:
    """Noisy copies (cosine about 0.9) of some of the page's tokens."""
    picked = page.vectors[rng.choice(len(page.vectors), tokens, replace=False)].astype(np.float32)
    return unit(picked + 0.5 * unit(rng.standard_normal(picked.shape)))


@pytest.fixture(scope="module")
def changes(redis_server):
    client = redis.Redis.from_url(f"{redis_server}/10")
    client.flushdb()
    return PageChanges(client)


@pytest.fixture
def writer(milvus_uri, changes):
    """The store as workers and the API use it: every change goes to the feed."""
    store = MilvusStore(milvus_uri, changes=changes)
    yield store
    store.close()


@pytest.fixture
def searcher(milvus_uri, changes):
    store = MilvusStore(milvus_uri)
    yield Searcher(store, changes, threads=2)
    store.close()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def pages(writer, rng):
    yield from page_collection(writer, rng)


def ranked(hits: list[dict]) -> list[tuple[str, int]]:
    return [(h["doc_id"], h["page"]) for h in hits]


def exhaustive(query: np.ndarray, pages: list[PageRecord], k: int) -> list[tuple[str, int]]:
    scores = reference_scores(query, pages)
    return [(pages[i].doc_id, pages[i].page) for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_int8_scan_ranks_as_exact_maxsim(rng, name):
    """With every kernel, the in-memory scores alone (before the exact rerank; fbgemm's rechecked
    from the codes) keep exhaustive MaxSim's top 10 within the pages they hand to the rerank, on
    random pages and random queries: the hard case."""
    kernel = kernels.KERNELS[name]
    records = make_pages(rng, 100)
    index = Int8Pages(DIM, kernel)
    for page in records:
        index.put(page)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            query = unit(rng.standard_normal((20, DIM)))
            top = {f"{d}#{p}" for d, p in exhaustive(query, records, 10)}
            assert top <= set(index.best(query, 10 + EXTRA, pool))


def test_search_is_exhaustive_maxsim_with_its_scores(searcher, pages, rng):
    by_key = {(p.doc_id, p.page): p for p in pages}
    for query in [query_from(pages[4], rng), query_from(pages[59], rng), unit(rng.standard_normal((20, DIM)))]:
        hits = searcher.search("pages", query, top_k=10)
        assert ranked(hits) == exhaustive(query, pages, 10)
        expected = reference_scores(query, [by_key[key] for key in ranked(hits)])
        np.testing.assert_allclose([h["score"] for h in hits], expected, rtol=1e-4)
    top = searcher.search("pages", query_from(pages[31], rng), top_k=1)[0]
    assert top == {
        "doc_id": pages[31].doc_id,
        "filename": pages[31].filename,
        "page": pages[31].page,
        "score": top["score"],
        "metadata": pages[31].metadata,
    }


def test_copy_follows_writes_deletes_and_drops_from_other_processes(searcher, writer, pages, rng):
    query = query_from(pages[7], rng)
    assert ranked(searcher.search("pages", query, top_k=1)) == [("doc-2", 1)]  # loaded now

    changed = PageRecord(**{**vars(pages[7]), "vectors": unit(rng.standard_normal((50, DIM))).astype(np.float16)})
    added = make_pages(rng, 2, first=20)
    writer.upsert_pages("pages", [changed, *added, *pages[:3]])  # pages[:3]: a redelivered batch
    current = [changed if p is pages[7] else p for p in pages] + added
    for q in (query, query_from(added[4], rng), query_from(changed, rng)):
        assert ranked(searcher.search("pages", q, top_k=10)) == exhaustive(q, current, 10)

    writer.delete_document("pages", "doc-21")
    writer.delete_document("pages", "no-such-doc")
    current = [p for p in current if p.doc_id != "doc-21"]
    hits = searcher.search("pages", query_from(added[4], rng), top_k=100)
    assert len(hits) == len(current) == 63 and "doc-21" not in {h["doc_id"] for h in hits}

    # Dropped and made again with another width: the copy starts over.
    writer.drop_collection("pages")
    with pytest.raises(NotFound):
        searcher.search("pages", query, top_k=1)
    writer.create_collection("pages", "multivector", DIM // 2, "colqwen-small")
    small = PageRecord("doc-x", 0, "x.pdf", {}, unit(rng.standard_normal((30, DIM // 2))).astype(np.float16))
    writer.upsert_pages("pages", [small])
    assert ranked(searcher.search("pages", small.vectors[:5].astype(np.float32), top_k=5)) == [("doc-x", 0)]


def test_catching_up_applies_changes_without_a_search(searcher, writer, pages, rng):
    searcher.preload()
    assert searcher.held()["pages"] == 60
    writer.upsert_pages("pages", make_pages(rng, 2, first=20))
    writer.delete_document("pages", "doc-0")
    searcher.rebalance(searcher.owned)
    assert searcher.held()["pages"] == 63
    writer.drop_collection("pages")
    searcher.rebalance(searcher.owned)
    assert "pages" not in searcher.held()  # its memory is let go
    writer.create_collection("pages", "multivector", DIM, "colqwen-test")  # for the fixture's drop


def test_a_new_searcher_loads_what_is_stored(milvus_uri, changes, writer, pages, rng):
    writer.delete_document("pages", "doc-0")
    store = MilvusStore(milvus_uri)
    fresh = Searcher(store, changes)
    fresh.preload()
    query = query_from(pages[10], rng)
    assert ranked(fresh.search("pages", query, top_k=10)) == exhaustive(query, pages[3:], 10)
    store.close()


def test_search_filters(searcher, pages, rng):
    query = query_from(pages[4], rng)  # doc-1, lang "de"
    hits = searcher.search("pages", query, top_k=10, filter='metadata["lang"] == "en"')
    assert ranked(hits) == exhaustive(query, [p for p in pages if p.metadata["lang"] == "en"], 10)
    hits = searcher.search("pages", query, top_k=10, filter='doc_id in ["doc-1", "doc-2"] and page >= 1')
    assert set(ranked(hits)) == {("doc-1", 1), ("doc-1", 2), ("doc-2", 1), ("doc-2", 2)}
    assert hits[0]["doc_id"] == "doc-1"
    assert {h["filename"] for h in searcher.search("pages", query, 10, filter='filename == "file-7.pdf"')} == {
        "file-7.pdf"
    }
    with pytest.raises(InvalidRequest, match="filter"):
        searcher.search("pages", query, 10, filter="no_such_field >")


def test_bad_queries_are_refused(searcher, writer, pages, rng):
    with pytest.raises(InvalidRequest, match="shape"):
        searcher.search("pages", rng.standard_normal((4, DIM // 2)))
    with pytest.raises(InvalidRequest, match="shape"):
        searcher.search("pages", np.full((4, DIM), np.nan))
    with pytest.raises(NotFound):
        searcher.search("no-such-collection", rng.standard_normal((4, DIM)))
    writer.create_collection("chunks", "text", DIM, "minilm")
    with pytest.raises(InvalidRequest, match="text"):
        searcher.search("chunks", rng.standard_normal((4, DIM)))
    writer.drop_collection("chunks")


def test_the_feed_is_trimmed_to_what_every_live_search_worker_applied(changes, searcher, writer, pages, rng):
    client = changes._client
    stream = keys.page_changes("pages")
    searcher.search("pages", query_from(pages[0], rng), top_k=1)  # loaded, feed applied
    for doc in range(3):
        writer.delete_document("pages", f"doc-{doc}")
    ids = [entry_id.decode() for entry_id, _ in client.xrange(stream)]
    first, last = ids[-3], ids[-1]
    changes.applied("pages", "search@a:1", last, live=["search@a:1", "search@b:2"])
    assert client.xlen(stream) == len(ids)  # b has not said what it applied: nothing goes
    changes.applied("pages", "search@b:2", first, live=["search@a:1", "search@b:2"])
    assert [i.decode() for i, _ in client.xrange(stream)] == ids[-3:]  # up to b's
    changes.applied("pages", "search@a:1", last, live=["search@a:1"])  # b has gone
    assert [i.decode() for i, _ in client.xrange(stream)] == [last]
    assert client.hkeys(keys.page_changes_applied("pages")) == [b"search@a:1"]


def test_the_kernel_is_chosen_by_timing_and_can_be_named():
    kernel, timings = kernels.choose("auto", 4096, threads=2)
    assert set(timings) >= {"int8", "float32"}
    fastest = min(timings, key=timings.get)
    # int8 (exact, so fewer pages to rescore) unless another is clearly faster
    assert kernel.name == (fastest if timings[fastest] <= kernels.PREFER_INT8_BELOW * timings["int8"] else "int8")
    assert kernels.choose("float32", 4096) == (kernels.KERNELS["float32"], {})
    with pytest.raises(ValueError, match="not available"):
        kernels.choose("avx9000", 4096)


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_every_kernel_gives_the_exact_product_of_the_codes(name, rng):
    kernel = kernels.KERNELS[name]
    block = torch.from_numpy(rng.integers(-127, 128, (300, DIM), dtype=np.int8))
    query = torch.from_numpy(rng.integers(-127, 128, (7, DIM), dtype=np.int8))
    exact = query.double() @ block.double().T
    got = kernel.product(query, kernel.prepare(block)).double()
    # fbgemm quantizes the query again, to 7 bits: about 1% of the largest product
    tolerance = 0.02 if name == "fbgemm" else 0
    assert ((got - exact).abs().max() / exact.abs().max()).item() <= tolerance


def test_shards_split_the_pages_and_together_answer_as_the_whole(milvus_uri, changes, pages, rng):
    store = MilvusStore(milvus_uri)
    try:
        sharded = Searcher(store, changes, threads=2, shards=4)
        whole = Searcher(store, changes, threads=2)
        sharded.rebalance({0, 1})  # holds nothing yet: rebalance loads only collections held
        for query in [query_from(pages[7], rng), unit(rng.standard_normal((20, DIM)))]:
            expected = whole.search("pages", query, top_k=10)
            parts = [sharded.search("pages", query, top_k=10, shards=[shard]) for shard in range(4)]
            for shard, part in enumerate(parts):
                assert all(shard_of(f"{h['doc_id']}#{h['page']}", 4) == shard for h in part)
            merged = sorted((hit for part in parts for hit in part), key=lambda h: -h["score"])[:10]
            assert ranked(merged) == ranked(expected)
        assert len(sharded.search("pages", query, top_k=1000, shards=[0, 2])) < len(pages)
        sharded.rebalance({0})
        assert sharded.held()["pages"] == len(pages)  # unowned shards stay while searches ask for them
        with pytest.raises(InvalidRequest):
            sharded.search("pages", query, shards=[4])
    finally:
        store.close()


def test_a_load_past_the_memory_budget_is_refused(milvus_uri, changes, pages, rng):
    store = MilvusStore(milvus_uri)
    try:
        small = Searcher(store, changes, shards=2, memory_bytes=10_000)
        with pytest.raises(OverBudget, match="EMBEDQ_SEARCH_MEMORY_GB"):
            small.search("pages", query_from(pages[0], rng))
        assert small.held() == {}  # nothing half-loaded
    finally:
        store.close()


def test_the_own_queues_of_stopped_search_workers_are_removed(redis_server):
    from types import SimpleNamespace

    from common.contract import search_queue
    from common.settings import Settings
    from workers.start import FORGET_SEARCHER_TTLS, _forget_stopped_searchers

    client = redis.Redis.from_url(f"{redis_server}/11")
    client.flushdb()
    settings = Settings(worker_heartbeat_ttl_s=15)
    now = time.time()
    for name, seen in (("search@gone:1", now - FORGET_SEARCHER_TTLS * 15 - 1), ("search@here:2", now)):
        client.hset(keys.SEARCH_QUEUES, name, seen)
        queue = search_queue(name)
        client.rpush(queue, "a message")
        client.sadd(f"_kombu.binding.{queue}", "binding")
        client.sadd(f"_kombu.binding_permanent.{queue}", "binding")
    _forget_stopped_searchers(SimpleNamespace(redis=client, settings=settings))
    assert client.hkeys(keys.SEARCH_QUEUES) == [b"search@here:2"]
    assert sorted(k.decode() for k in client.keys("*search.pages*")) == [
        "_kombu.binding.search.pages.search@here:2",
        "_kombu.binding_permanent.search.pages.search@here:2",
        "search.pages.search@here:2",
    ]
    client.flushdb()


def test_blocks_prepared_before_the_codes_grow_are_made_again(rng):
    """A block's prepared form is a view of the codes: once they are copied to grow, the old form
    would keep the old copy alive (and double the memory)."""
    index = Int8Pages(DIM, kernels.KERNELS["int8"])
    # 2,048 tokens a page: 24 pages a block. Block 0 is full and prepared before the codes grow.
    pages = [PageRecord(f"d{i}", 0, "f.pdf", {}, unit(rng.standard_normal((2048, DIM)))) for i in range(40)]
    for page in pages[:30]:
        index.put(page)
    index.prepare()
    for page in pages[30:]:  # the codes grow from 36 pages to 54
        index.put(page)
    index.prepare()
    for bucket in index._buckets.values():
        for _, prepared in bucket._prepared.values():
            assert prepared.untyped_storage().data_ptr() == bucket.codes.untyped_storage().data_ptr()


def test_shard_owners_are_balanced_agreed_and_move_little_when_a_worker_joins():
    moved = []
    for pids in range(200):
        workers = [f"search@vm:{1000 + pids}", f"search@vm:{2000 + 7 * pids}"]
        owned = owners(4, workers)
        assert owned == owners(4, reversed(workers))
        assert sorted(Counter(owned.values()).values()) == [2, 2]
        grown = owners(4, [*workers, f"search@vm:{3000 + pids}"])
        assert max(Counter(grown.values()).values()) == 2
        moved.append(sum(owned[shard] != grown[shard] for shard in range(4)))
    assert sum(moved) / len(moved) < 2  # the newcomer's share is 4/3 of a shard
