"""Random pages of token vectors for the store and search tests."""

from __future__ import annotations

import numpy as np

from common.store.milvus import PageRecord

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_pages(rng: np.random.Generator, docs: int, pages_per_doc: int = 3, first: int = 0) -> list[PageRecord]:
    """Documents `first`... of random unit token vectors, 40 to 80 tokens a page (so several token
    counts), stored as float16, with metadata to filter on."""
    return [
        PageRecord(
            f"doc-{d}",
            p,
            f"file-{d}.pdf",
            {"lang": ["en", "de"][d % 2], "year": 2000 + d},
            unit(rng.standard_normal((int(rng.integers(40, 81)), DIM))).astype(np.float16),
        )
        for d in range(first, first + docs)
        for p in range(pages_per_doc)
    ]


def page_collection(store, rng: np.random.Generator, name: str = "pages"):
    """For a fixture to `yield from`: a multi-vector collection of 20 documents × 3 pages in
    `store` (not flushed: reads see unflushed rows too), dropped afterwards."""
    store.create_collection(name, "multivector", DIM, "colqwen-test")
    pages = make_pages(rng, 20)
    store.upsert_pages(name, pages)
    yield pages
    store.drop_collection(name)
