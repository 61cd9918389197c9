"""Token pooling of page vectors before they are stored, for page collections made with a
`pool_factor` above 1: colpali-engine's `HierarchicalTokenPooler` (Ward clustering of a page's
token vectors into at most `n_tokens // pool_factor` clusters, each stored as its L2-normalized
mean). Queries are never pooled.

It pools the float16 vectors a page would be stored as unpooled, so a pooled page is exactly the
pooler's output for the unpooled one. It runs on the CPU in the task's thread, not in the batcher's,
so the device goes on with the next batch meanwhile.
"""

from __future__ import annotations

import numpy as np
import torch


def pool_pages(pages: list[np.ndarray], pool_factor: int) -> list[np.ndarray]:
    """Each page's `(n_tokens, dim)` float16 vectors pooled by `pool_factor`; unchanged at 1, and for
    a page of a single token (the pooler refuses those)."""
    if pool_factor == 1:
        return pages
    # Here, not at the top: a worker that stores no pooled pages never loads colpali-engine for it.
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    return [
        page if len(page) < 2 else pooler.pool_embeddings([torch.from_numpy(page)], pool_factor=pool_factor)[0].numpy()
        for page in pages
    ]
