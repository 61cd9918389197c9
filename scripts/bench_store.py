"""Benchmark multi-vector search in the store: latency, and recall against exhaustive MaxSim.

Data (the hard case: no structure for an index to exploit): every page is `tokens` independent
random unit vectors of dimension `dim`, stored as float16. A query picks `targets` distinct pages
at random; its token j is a noisy copy of a random token of target j mod `targets`:
normalize(t + noise * u) with u a random unit vector, so cos(query token, its source) is about
1 / sqrt(1 + noise**2) (0.71 at noise 1). Everything else about a query is noise.

Reported per size: load time (upsert of all pages + flush), search latency p50/p99 over the
queries (`MilvusStore.search_multivector`, end to end from the client), `recall@k` (the store's
top k against the top k of exhaustive float32 MaxSim over every stored page, in NumPy),
`targets@k` (share of the target pages in the store's top k; the exhaustive top k holds them
all), and the largest relative difference between a returned score and its exact MaxSim.

With one target, the rest of the exhaustive top k are pages that lead the other random pages by
chance, by less than the spread of their scores; no candidate stage short of scoring every page
finds those, so `recall@k` stays near 1/k plus chance, and `targets@k` measures the candidate stage.

    python scripts/bench_store.py --pages 1000 10000        # starts a Milvus Lite server
    python scripts/bench_store.py --uri http://host:19530   # or uses a running Milvus
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

# As the API process should run: one OpenBLAS thread. On 2 cores shared with the Milvus server, a
# second BLAS thread waits for a busy core on every small product (a search at 1k pages took
# 92 ms instead of 45 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import procs  # noqa: E402
from common.milvus_server import MilvusLiteServer  # noqa: E402
from common.milvus_store import CANDIDATES, MilvusStore, PageRecord  # noqa: E402

WRITE_PAGES = 256
WARMUP = 5


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exhaustive_maxsim(queries: np.ndarray, pages: np.ndarray, block: int = 64) -> np.ndarray:
    """(n_queries, n_pages) MaxSim scores of every query against every page, in float32."""
    n_queries, query_tokens, dim = queries.shape
    flat = queries.reshape(-1, dim)
    scores = np.empty((n_queries, len(pages)), np.float32)
    for start in range(0, len(pages), block):
        chunk = pages[start : start + block].astype(np.float32)
        sims = (flat @ chunk.reshape(-1, dim).T).reshape(n_queries, query_tokens, len(chunk), -1)
        scores[:, start : start + block] = sims.max(axis=3).sum(axis=1)
    return scores


def _settle(store: MilvusStore, collection: str, probe: np.ndarray, timeout: float = 900) -> None:
    """Wait out the server's background work after a bulk load (milvus-lite compacts segments and
    builds their indexes in a background thread, and searches meanwhile run slower): return once
    the best of 3 probe searches stops improving (by 10%) from one round to the next."""
    best, deadline = float("inf"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        latencies = []
        for _ in range(3):
            t0 = time.perf_counter()
            store.search_multivector(collection, probe)
            latencies.append(time.perf_counter() - t0)
        if min(latencies) > 0.9 * best:
            return
        best = min(best, *latencies)
        time.sleep(2)


def bench_search(uri: str, pages: int, *, tokens: int = 736, dim: int = 128, queries: int = 50,
                 query_tokens: int = 20, targets: int = 1, noise: Sequence[float] = (1.0,), top_k: int = 10,
                 candidates: Sequence[int] = (CANDIDATES,), seed: int = 0, collection: str = "bench_store") -> dict:
    """Fill `collection` (dropped first and after) with random pages, then time and score searches:
    `queries` queries per noise level, each run with every candidate count."""
    rng = np.random.default_rng(seed)
    store = MilvusStore(uri)
    store.drop_collection(collection)
    store.create_collection(collection, "multivector", dim, "bench")
    stored = np.empty((pages, tokens, dim), np.float16)
    started = time.perf_counter()
    for start in range(0, pages, WRITE_PAGES):
        batch = range(start, min(start + WRITE_PAGES, pages))
        stored[batch.start : batch.stop] = _unit(rng.standard_normal((len(batch), tokens, dim), dtype=np.float32))
        store.upsert_pages(collection, [PageRecord(f"doc{i}", 0, f"doc{i}.pdf", {}, stored[i]) for i in batch])
    store.flush(collection)
    result = {"pages": pages, "load_s": round(time.perf_counter() - started, 1), "runs": []}
    started = time.perf_counter()
    _settle(store, collection, _unit(rng.standard_normal((query_tokens, dim), dtype=np.float32)))
    result["settle_s"] = round(time.perf_counter() - started, 1)

    for level in noise:
        chosen = np.stack([rng.choice(pages, targets, replace=False) for _ in range(queries)])
        owners = chosen[:, np.arange(query_tokens) % targets]
        sources = stored[owners, rng.integers(0, tokens, owners.shape)].astype(np.float32)
        query_set = _unit(sources + level * _unit(rng.standard_normal(sources.shape, dtype=np.float32)))
        exact = exhaustive_maxsim(query_set, stored)
        exact_top = np.argsort(-exact, axis=1)[:, :top_k]
        for count in candidates:
            for query in query_set[:WARMUP]:
                store.search_multivector(collection, query, top_k, candidates=count)
            latencies, recall, hit_targets, score_error = [], [], [], 0.0
            for q, query in enumerate(query_set):
                t0 = time.perf_counter()
                hits = store.search_multivector(collection, query, top_k, candidates=count)
                latencies.append(1e3 * (time.perf_counter() - t0))
                ids = [int(h.doc_id[3:]) for h in hits]
                recall.append(len(set(ids) & set(exact_top[q])) / top_k)
                hit_targets.append(len(set(ids) & set(chosen[q])) / targets)
                score_error = max(score_error, *(abs(h.score / exact[q, i] - 1) for h, i in zip(hits, ids)))
            latencies.sort()
            result["runs"].append({
                "noise": level, "candidates": count, "p50_ms": round(statistics.median(latencies), 1),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
                f"recall@{top_k}": round(float(np.mean(recall)), 3),
                f"targets@{top_k}": round(float(np.mean(hit_targets)), 3),
                "score_rel_err": float(f"{score_error:.1e}"),
            })
    store.drop_collection(collection)
    store.close()
    return result


def _peak_rss_gb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--uri", help="a running Milvus; default: start a Milvus Lite server in a temp dir")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=736)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--targets", type=int, default=1)
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--candidates", type=int, nargs="+", default=[CANDIDATES, 2 * CANDIDATES])
    args = parser.parse_args()
    options = dict(queries=args.queries, tokens=args.tokens, query_tokens=args.query_tokens,
                   targets=args.targets, noise=args.noise, candidates=args.candidates)
    print(f"options: {options}")
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.uri else MilvusLiteServer(Path(tmp) / "milvus", procs.free_port()).start()
        try:
            for n in args.pages:
                result = bench_search(args.uri or server.uri, n, **options)
                if server:
                    print(f"{n} pages: Milvus Lite server peak RSS {_peak_rss_gb(server.proc.pid):.1f} GB")
                if n == args.pages[0]:
                    print(" | ".join(f"{key:>13}" for key in ["pages", "load_s", "settle_s", *result["runs"][0]]))
                for run in result["runs"]:
                    row = [n, result["load_s"], result["settle_s"], *run.values()]
                    print(" | ".join(f"{value:>13}" for value in row), flush=True)
        finally:
            if server:
                server.stop()


if __name__ == "__main__":
    main()
