"""Exhaustive MaxSim search over late-interaction collections, held in a search worker's memory.

Why score every page: on pages without structure for an index to use (random token vectors, the
hard case), the pages that MaxSim ranks 2nd to 10th lead the rest by less than the spread of their
scores, and no candidate stage short of scoring every page finds them; a page-level encoding
(MUVERA's FDE) also averages the few tokens a query matches with hundreds of others. So a search
scores every page, cheaply, then exactly:

1. Every page's token vectors are kept here as int8 codes with one scale per page (its largest
   absolute component / 127): 94 KB for a page of 736 tokens of dim 128. Pages are grouped by token
   count, so a block of pages is one (pages x tokens, dim) matrix. The query is quantized alike;
   one matrix product per block and a max over each page's tokens give every
   page's approximate MaxSim. The products are most of a search's time: at 10k pages on 2 cores,
   about 40 ms plus 3.5 ms per query token where int8 products are fast. How a product runs
   (torch's int8 product, fbgemm's, or float32 BLAS) is timed at start-up (workers.search.kernels).
2. A kernel whose products are not exact in the codes' units (fbgemm's) has its best
   `top_k + EXTRA + recheck` pages scored again from their codes with an exact product, in memory.
3. The best `top_k + EXTRA` pages (int8 scores are off by about 0.05%, which reorders pages with
   nearly equal scores; over 40 queries at 10k random pages, exhaustive MaxSim's top 10 were always
   within the int8 top 15) are read back from Milvus (their float16 vectors, in one call, about 2 ms
   a page of 736 tokens from Milvus Lite) and scored exactly in float32, so the returned scores are
   colpali-engine's `score_multi_vector` over the stored vectors.

The copy follows the collection through its change feed (common.store.changes): before each search,
the entries since the last one applied name the pages to re-read from Milvus or drop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import InvalidRequest, NotFound, ServiceUnavailable
from common.shards import shard_of
from common.store.changes import PageChanges
from common.store.milvus import MilvusStore, PageRecord
from common.vectors import maxsim

from . import kernels
from .kernels import Kernel

log = logging.getLogger(__name__)

BLOCK_TOKENS = 49_152  # tokens per int8 product: its int32 output (4 MB for 20 query tokens) stays in cache
LOAD_BATCH = 64  # pages per read from Milvus (about 16 MB for pages of 736 tokens)
EXTRA = 8  # pages read back and scored exactly beyond top_k
ABANDON_S = 30.0  # a shard no longer owned here goes once no search asked for it for this long


def _quantize(vectors: torch.Tensor) -> tuple[torch.Tensor, float]:
    scale = float(vectors.abs().max()) / 127 or 1.0
    return torch.round(vectors / scale).to(torch.int8), scale


@dataclass
class _Bucket:
    """The pages of one token count, in slots of a growing int8 array."""

    tokens: int
    dim: int
    codes: torch.Tensor = field(init=False)  # (capacity, tokens, dim) int8
    scales: torch.Tensor = field(init=False)  # (capacity,) float32
    live: torch.Tensor = field(init=False)  # (capacity,) bool: `keys` as a mask, so a search needs no loop
    keys: list[str | None] = field(default_factory=list)  # page key per used slot; None: free
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.codes = torch.empty((0, self.tokens, self.dim), dtype=torch.int8)
        self.scales = torch.empty(0)
        self.live = torch.empty(0, dtype=torch.bool)

    _prepared: dict[int, tuple[int, Any]] = field(default_factory=dict)  # block start -> (stop, kernel's form)

    @property
    def block(self) -> int:
        """Pages per block product."""
        return max(1, BLOCK_TOKENS // self.tokens)

    def put(self, key: str, codes: torch.Tensor, scale: float) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            slot = len(self.keys)
            self.keys.append(None)
            if slot == len(self.codes):
                grow = max(16, slot // 2)
                self.codes = torch.cat([self.codes, torch.empty((grow, self.tokens, self.dim), dtype=torch.int8)])
                self.scales = torch.cat([self.scales, torch.empty(grow)])
                self.live = torch.cat([self.live, torch.zeros(grow, dtype=torch.bool)])
                self._prepared.clear()  # they are of the codes before the copy, which they would keep alive
        self.codes[slot], self.scales[slot], self.live[slot], self.keys[slot] = codes, scale, True, key
        self._prepared.pop(slot - slot % self.block, None)
        return slot

    def remove(self, slot: int) -> None:
        self.keys[slot], self.live[slot] = None, False
        self.free.append(slot)

    def prepared(self, start: int, kernel: Kernel) -> Any:
        """The block of pages from `start` in the form `kernel` multiplies, made again after a write."""
        stop = min(len(self.keys), start + self.block)
        cached = self._prepared.get(start)
        if cached is None or cached[0] != stop:
            cached = self._prepared[start] = (stop, kernel.prepare(self.codes[start:stop].view(-1, self.dim)))
        return cached[1]

    def scores(self, query: torch.Tensor, query_scale: float, kernel: Kernel, pool: ThreadPoolExecutor) -> torch.Tensor:
        """Approximate MaxSim of the int8 `query` against every used slot; -inf for free ones. The
        blocks are shared out among the pool's threads."""
        used = len(self.keys)
        out = torch.empty((len(query), used), dtype=torch.float32)

        def scan(start: int) -> None:
            stop = min(used, start + self.block)
            sims = kernel.product(query, self.prepared(start, kernel))
            out[:, start:stop] = torch.amax(sims.view(len(query), stop - start, self.tokens), dim=2)

        list(pool.map(scan, range(0, used, self.block)))
        scores = out.sum(dim=0) * self.scales[:used] * query_scale
        return scores.masked_fill_(~self.live[:used], -torch.inf)


class Int8Pages:
    """One collection's pages as int8 codes, by page key."""

    def __init__(self, dim: int, kernel: Kernel):
        self.dim, self.kernel = dim, kernel
        self._buckets: dict[int, _Bucket] = {}
        self._where: dict[str, tuple[_Bucket, int]] = {}
        self._by_doc: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        """Memory the codes take, with the kernel's own form of them."""
        return sum(bucket.codes.numel() for bucket in self._buckets.values()) * self.kernel.bytes_per_code

    def put(self, page: PageRecord) -> None:
        self.remove(page.key)
        codes, scale = _quantize(torch.from_numpy(np.asarray(page.vectors, np.float32)))
        if len(codes) not in self._buckets:
            self._buckets[len(codes)] = _Bucket(len(codes), self.dim)
        bucket = self._buckets[len(codes)]
        self._where[page.key] = (bucket, bucket.put(page.key, codes, scale))
        self._by_doc.setdefault(page.doc_id, set()).add(page.key)

    def remove(self, key: str) -> None:
        if key in self._where:
            bucket, slot = self._where.pop(key)
            bucket.remove(slot)
            doc_id = key.rsplit("#", 1)[0]
            self._by_doc[doc_id].discard(key)
            if not self._by_doc[doc_id]:
                del self._by_doc[doc_id]

    def remove_document(self, doc_id: str) -> None:
        for key in list(self._by_doc.get(doc_id, ())):
            self.remove(key)

    def prepare(self) -> None:
        """Put every block in the kernel's form now, so that no search waits for it."""
        for bucket in self._buckets.values():
            for start in range(0, len(bucket.keys), bucket.block):
                bucket.prepared(start, self.kernel)

    def best(
        self, query: np.ndarray, count: int, pool: ThreadPoolExecutor, allowed: set[str] | None = None
    ) -> list[str]:
        """The keys of the `count` pages with the highest approximate MaxSim (among `allowed`),
        scored by the threads of `pool`."""
        codes, scale = _quantize(torch.from_numpy(np.array(query, np.float32)))  # a writable copy
        keys: list[str | None] = []
        scores = []
        for bucket in self._buckets.values():
            keys.extend(bucket.keys)
            scores.append(bucket.scores(codes, scale, self.kernel, pool))
        if not keys:
            return []
        everything = torch.cat(scores)
        if allowed is not None:
            everything[[i for i, key in enumerate(keys) if key not in allowed]] = -torch.inf
        top = torch.topk(everything, min(count + self.kernel.recheck, len(keys)))
        found = [keys[i] for i, score in zip(top.indices.tolist(), top.values.tolist()) if score > -torch.inf]
        if self.kernel.recheck:
            found = sorted(found, key=self._exact_scorer(codes), reverse=True)
        return found[:count]

    def _exact_scorer(self, codes: torch.Tensor):
        """MaxSim of the query `codes` against a held page's codes, exact in their units (float32
        sums of int8 products stay under 2**24)."""
        query = codes.float()

        def score(key: str) -> float:
            bucket, slot = self._where[key]
            sims = query @ bucket.codes[slot].float().T
            return float(sims.amax(dim=1).sum() * bucket.scales[slot])

        return score


def _checked(query: np.ndarray, dim: int) -> np.ndarray:
    query = np.asarray(query, np.float32)
    if query.ndim != 2 or query.shape[1] != dim or not len(query) or not np.isfinite(query).all():
        raise InvalidRequest(f"query must be finite token vectors in shape (n, {dim}), not {query.shape}", "query")
    return query


@dataclass
class _Copy:
    dim: int
    applied: str  # the last change feed entry applied
    shards: dict[int, Int8Pages] = field(default_factory=dict)  # the shards held here
    asked: dict[int, float] = field(default_factory=dict)  # shard -> when a search last asked for it

    def __len__(self) -> int:
        return sum(len(pages) for pages in self.shards.values())

    def nbytes(self) -> int:
        return sum(pages.nbytes() for pages in self.shards.values())


class OverBudget(ServiceUnavailable):
    """The pages asked for do not fit this search worker's memory budget."""


class Searcher:
    """Search late-interaction collections: every page of the shards held here scored in memory,
    the best exactly. A page's shard is `common.shards.shard_of(key, shards)`; which shards a
    worker holds follows from the live search workers (`rebalance`), and a search asking for a
    shard not held here loads it first."""

    def __init__(
        self,
        store: MilvusStore,
        changes: PageChanges,
        threads: int = 1,
        kernel: str = "auto",
        shards: int = 1,
        memory_bytes: int | None = None,
    ):
        """`threads` scan at once, each running torch on one core: faster than torch's own threads
        on the same cores (a search at 6k pages on 2 cores: 93 against 105 ms), so give torch one.
        `kernel`: a name of workers.search.kernels, or `auto` to time them here and take the fastest.
        `memory_bytes`: the most the pages held here may take; a load past it is refused."""
        self.kernel, self.kernel_timings = kernels.choose(kernel, BLOCK_TOKENS, threads)
        self.store = store
        self.changes = changes
        self.shards = shards
        self.memory_bytes = memory_bytes
        self.owned: set[int] = set(range(shards))  # until told otherwise (rebalance)
        self._copies: dict[str, _Copy] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="embedq-scan")

    def preload(self) -> None:
        """Load the owned shards of every late-interaction collection, so first searches do not wait."""
        for info in self.store.list_collections():
            if info.kind == "multivector":
                with self._lock:
                    self._current(info.name, self.owned)

    def held(self) -> dict[str, int]:
        """Pages held here, per collection."""
        return {name: len(copy) for name, copy in list(self._copies.items())}

    def nbytes(self) -> int:
        return sum(copy.nbytes() for copy in list(self._copies.values()))

    def applied(self) -> dict[str, str]:
        """The last change feed entry applied, per collection held here."""
        return {name: copy.applied for name, copy in list(self._copies.items())}

    def rebalance(self, owned: set[int]) -> None:
        """Hold the shards `owned` of every collection held here: load those missing, let go of the
        others once no search has asked for them for ABANDON_S, and apply the changes waiting. The
        search worker does it every second, so a search seldom waits for the pages of a large job,
        and the memory of a dropped collection goes."""
        self.owned = owned
        now = time.monotonic()
        for name in list(self._copies):
            with self._lock, contextlib.suppress(NotFound):
                copy = self._copies.get(name)
                if copy is None:
                    continue
                for shard in set(copy.shards) - owned:
                    if now - copy.asked.get(shard, 0.0) > ABANDON_S:
                        del copy.shards[shard]
                        log.info("let go of shard %d of %s", shard, name)
                self._current(name, owned)

    def search(
        self,
        collection: str,
        query: np.ndarray,
        top_k: int = 10,
        filter: str | None = None,
        shards: list[int] | None = None,
    ) -> list[dict]:
        """The `top_k` pages of `shards` (default: all) by exact MaxSim: `[{doc_id, filename, page,
        score, metadata}]`, best first."""
        wanted = set(range(self.shards)) if shards is None else set(shards)
        if not wanted <= set(range(self.shards)):
            raise InvalidRequest(f"shards must be in [0, {self.shards}), not {sorted(wanted)}", "shards")
        with self._lock:
            copy = self._current(collection, wanted)
            now = time.monotonic()
            copy.asked.update(dict.fromkeys(wanted, now))
            query = _checked(query, copy.dim)
            allowed = self.store.matching_keys(collection, filter) if filter else None
            candidates = [
                key
                for shard in sorted(wanted)
                for key in copy.shards[shard].best(query, top_k + EXTRA, self._pool, allowed)
            ]
        pages = self.store.fetch_pages(collection, candidates)
        if allowed is not None:  # a page written since the filter was read may pass it no more
            pages = [p for p in pages if p.key in allowed]
        scores = maxsim(query, [p.vectors for p in pages])
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [
            {
                "doc_id": pages[i].doc_id,
                "filename": pages[i].filename,
                "page": pages[i].page,
                "score": float(scores[i]),
                "metadata": pages[i].metadata,
            }
            for i in order
        ]

    def _current(self, collection: str, shards: set[int]) -> _Copy:
        """The copy of `collection` holding at least `shards`, with every change since applied."""
        copy = self._copies.get(collection)
        if copy is None:
            info = self.store.describe(collection, fresh=True)  # NotFound when there is none
            if info.kind != "multivector":
                raise InvalidRequest(f"collection {collection!r} holds {info.kind} vectors, not pages", "collection")
            # The feed's position is read before the pages: what follows is replayed after.
            copy = _Copy(info.dim, self.changes.last_id(collection))
        if missing := shards - set(copy.shards):
            self._load(collection, copy, missing)
        self._copies[collection] = copy
        changes = self.changes.since(collection, copy.applied)
        if not changes:
            return copy
        stale: dict[str, None] = {}  # keys to read again, in order
        for change in changes:
            if change.op == "drop":
                del self._copies[collection]
                return self._current(collection, shards | set(copy.shards))
            if change.op == "delete":
                for pages in copy.shards.values():
                    pages.remove_document(change.doc_id)
                stale = {k: None for k in stale if k.rsplit("#", 1)[0] != change.doc_id}
            else:
                stale.update((k, None) for k in change.page_keys if shard_of(k, self.shards) in copy.shards)
        stale_keys = list(stale)
        for start in range(0, len(stale_keys), LOAD_BATCH):
            wanted = stale_keys[start : start + LOAD_BATCH]
            fresh = self.store.fetch_pages(collection, wanted)
            for key in set(wanted) - {page.key for page in fresh}:  # gone from Milvus since
                copy.shards[shard_of(key, self.shards)].remove(key)
            for page in fresh:
                copy.shards[shard_of(page.key, self.shards)].put(page)
            self._check_budget(collection)
        for pages in copy.shards.values():
            pages.prepare()
        copy.applied = changes[-1].id
        return copy

    def _load(self, collection: str, copy: _Copy, shards: set[int]) -> None:
        """Read `shards` of `collection` from Milvus into `copy` (all or none of them)."""
        loading = {shard: Int8Pages(copy.dim, self.kernel) for shard in shards}
        loaded = 0
        for pages in self.store.iter_pages(collection, LOAD_BATCH):
            for page in pages:
                if (target := loading.get(shard_of(page.key, self.shards))) is not None:
                    target.put(page)
                    loaded += page.vectors.size
            self._check_budget(collection, loaded)
        for pages in loading.values():
            pages.prepare()
        copy.shards.update(loading)
        log.info("loaded shards %s of %s: %d pages", sorted(shards), collection, sum(map(len, loading.values())))

    def _check_budget(self, collection: str, loading: int = 0) -> None:
        if self.memory_bytes is not None and self.nbytes() + loading > self.memory_bytes:
            raise OverBudget(
                f"The pages of '{collection}' this search worker must hold pass its memory budget of "
                f"{self.memory_bytes / 2**30:.1f} GB (EMBEDQ_SEARCH_MEMORY_GB); run more search workers "
                "(each holds a share of the shards) or give them more memory."
            )
