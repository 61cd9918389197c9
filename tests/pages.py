"""Random pages of token vectors for the store and search tests."""

from __future__ import annotations

import numpy as np

from common.milvus_store import PageRecord

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_pages(rng: np.random.Generator, docs: int, pages_per_doc: int = 3, first: int = 0) -> list[PageRecord]:
    """Documents `first`... of random unit token vectors, 40 to 80 tokens a page (so several token
    counts), stored as float16, with metadata to filter on."""
    return [
        PageRecord(f"doc-{d}", p, f"file-{d}.pdf", {"lang": ["en", "de"][d % 2], "year": 2000 + d},
                   unit(rng.standard_normal((int(rng.integers(40, 81)), DIM))).astype(np.float16))
        for d in range(first, first + docs) for p in range(pages_per_doc)
    ]
