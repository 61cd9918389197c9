"""Benchmark late-interaction search: latency, and recall against exhaustive MaxSim.

Data (the hard case: no structure for an index to exploit): every page is `tokens` independent
random unit vectors of dimension `dim`, stored as float16 in Milvus through `MilvusStore` (so the
change feed carries them). Two kinds of query of `query_tokens` tokens:

* `planted`: the query picks `targets` distinct pages at random; its token j is a noisy copy of a
  random token of target j mod `targets`: normalize(t + noise * u), u a random unit vector, so
  cos(query token, its source) is about 1 / sqrt(1 + noise**2) (0.71 at noise 1);
* `random`: random unit vectors, related to no page: the exhaustive top k are pages that lead the
  others by chance.

Searches run as the search workers run them (`workers.search.scan.Searcher`, in this process: the
Celery hop adds 2-4 ms; `--shards N`: N searchers, one shard each, searched at once and merged as
the API merges, and one shard alone timed too), once the Milvus Lite server has finished its work
on the load. `--tokens 245` stores pages as a pool factor of 3 leaves 736-token pages. Reported per size: write time (upsert + flush), the searcher's load time
and memory, search latency p50/p99, `recall@k` (the top k against the top k of exhaustive float32
MaxSim over every stored page, in NumPy), `targets@k` (share of planted targets in the top k), and
the largest relative difference between a returned score and its exact MaxSim.

    python scripts/bench_store.py --pages 1000 10000        # starts Milvus Lite (and Redis if needed)
    python scripts/bench_store.py --uri http://host:19530   # or uses a running Milvus
    python scripts/bench_store.py --kernel fbgemm           # a scan kernel by name (default: timed, fastest)
    python scripts/bench_store.py --tokens 245 --shards 2   # pooled pages (factor 3), two search workers
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch.cli import SEARCH_WORKER_ENV  # noqa: E402

for _name, _value in SEARCH_WORKER_ENV.items():  # as the search worker runs
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from common.launch import procs  # noqa: E402
from common.launch.milvus_lite import MilvusLiteServer  # noqa: E402
from common.store.changes import PageChanges  # noqa: E402
from common.store.milvus import MilvusStore, PageRecord  # noqa: E402
from workers.search import kernels  # noqa: E402
from workers.search.scan import BLOCK_TOKENS, Searcher  # noqa: E402

WRITE_PAGES = 256
WARMUP = 3


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


def page_batches(pages: int, tokens: int, dim: int, seed: int) -> Iterator[tuple[range, np.ndarray]]:
    """The benchmark's pages, WRITE_PAGES at a time, each batch from its own seed: they can be made
    again instead of kept (100k pages of 245 tokens are 6 GB of float16)."""
    for start in range(0, pages, WRITE_PAGES):
        batch = range(start, min(start + WRITE_PAGES, pages))
        rng = np.random.default_rng([seed, start])
        yield batch, _unit(rng.standard_normal((len(batch), tokens, dim), dtype=np.float32)).astype(np.float16)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_idle(pid: int, timeout: float = 900) -> None:
    """Wait out the Milvus Lite server's background work after a bulk load (it compacts segments
    and builds their indexes, and would take cores from the searches): until it uses under 5% of
    a core over 2 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_s(pid)
        time.sleep(2)
        if _cpu_s(pid) - before < 0.1:
            return


def bench_search(
    uri: str,
    client: redis.Redis,
    pages: int,
    server_pid: int | None = None,
    *,
    tokens: int = 736,
    dim: int = 128,
    queries: int = 50,
    query_tokens: int = 20,
    targets: int = 1,
    noise: float = 1.0,
    top_k: int = 10,
    seed: int = 0,
    collection: str = "bench_store",
    kernel: str = "auto",
    shards: int = 1,
) -> dict:
    """Fill `collection` (dropped first and after) with random pages, then time and score searches."""
    rng = np.random.default_rng(seed)
    store = MilvusStore(uri, changes=PageChanges(client))
    store.drop_collection(collection)
    store.create_collection(collection, "multivector", dim, "bench")
    chosen = np.stack([rng.choice(pages, targets, replace=False) for _ in range(queries)])
    owners = chosen[:, np.arange(query_tokens) % targets]
    source_tokens = rng.integers(0, tokens, owners.shape)
    sources = np.empty((*owners.shape, dim), np.float32)
    started = time.perf_counter()
    for batch, vectors in page_batches(pages, tokens, dim, seed):
        here = (owners >= batch.start) & (owners < batch.stop)
        sources[here] = vectors[owners[here] - batch.start, source_tokens[here]]
        upserts = [PageRecord(f"doc{i}", 0, f"doc{i}.pdf", {}, vectors[i - batch.start]) for i in batch]
        store.upsert_pages(collection, upserts)
    store.flush(collection)
    result = {"pages": pages, "kernel": "", "write_s": round(time.perf_counter() - started, 1), "runs": []}
    if server_pid:
        _wait_idle(server_pid)

    # One searcher per shard stands in for one search worker per shard (the Celery hop, 2-4 ms,
    # left out); they share this machine's cores, as workers on one machine would.
    threads = max(1, (os.cpu_count() or 1) // shards)
    searchers = [
        Searcher(MilvusStore(uri), PageChanges(client), threads=threads, kernel=kernel, shards=shards)
        for _ in range(shards)
    ]
    started = time.perf_counter()
    for shard, searcher in enumerate(searchers):
        searcher.owned = {shard}
        searcher.preload()
    result["load_s"] = round(time.perf_counter() - started, 1)
    result["kernel"] = searchers[0].kernel.name
    result["shards"] = shards
    result["gb_per_worker"] = round(max(searcher.nbytes() for searcher in searchers) / 2**30, 2)
    fan_out = ThreadPoolExecutor(shards)

    def search(query: np.ndarray) -> list[dict]:
        parts = fan_out.map(lambda i: searchers[i].search(collection, query, top_k, shards=[i]), range(shards))
        return sorted((hit for part in parts for hit in part), key=lambda hit: -hit["score"])[:top_k]

    query_sets = {
        "planted": _unit(sources + noise * _unit(rng.standard_normal(sources.shape, dtype=np.float32))),
        "random": _unit(rng.standard_normal(sources.shape, dtype=np.float32)),
    }
    everything = np.concatenate(list(query_sets.values()))
    exact_all = np.concatenate(
        [exhaustive_maxsim(everything, vectors) for _, vectors in page_batches(pages, tokens, dim, seed)], axis=1
    )
    for k, (kind, query_set) in enumerate(query_sets.items()):
        exact = exact_all[k * queries : (k + 1) * queries]
        exact_top = np.argsort(-exact, axis=1)[:, :top_k]
        for query in query_set[:WARMUP]:
            search(query)
        latencies, alone, recall, hit_targets, score_error = [], [], [], [], 0.0
        for q, query in enumerate(query_set):
            t0 = time.perf_counter()
            hits = search(query)
            latencies.append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            searchers[0].search(collection, query, top_k, shards=[0])
            alone.append(1e3 * (time.perf_counter() - t0))
            ids = [int(h["doc_id"][3:]) for h in hits]
            recall.append(len(set(ids) & set(exact_top[q])) / top_k)
            hit_targets.append(len(set(ids) & set(chosen[q])) / targets)
            score_error = max(score_error, *(abs(h["score"] / exact[q, i] - 1) for h, i in zip(hits, ids)))
        latencies.sort()
        result["runs"].append(
            {
                "queries": kind,
                "p50_ms": round(statistics.median(latencies), 1),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
                "one_shard_p50_ms": round(statistics.median(alone), 1),
                f"recall@{top_k}": round(float(np.mean(recall)), 3),
                f"targets@{top_k}": round(float(np.mean(hit_targets)), 3) if kind == "planted" else "-",
                "score_rel_err": float(f"{score_error:.1e}"),
            }
        )
    fan_out.shutdown()
    store.drop_collection(collection)
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--uri", help="a running Milvus; default: start a Milvus Lite server in a temp dir")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=736)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--targets", type=int, default=1)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=1, help="search workers, one shard each")
    parser.add_argument("--kernel", default="auto", choices=["auto", *kernels.KERNELS], help="the page scan's product")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the search worker runs: its searcher's threads share the cores out
    options = dict(
        queries=args.queries, tokens=args.tokens, query_tokens=args.query_tokens, targets=args.targets, noise=args.noise
    )
    timings = kernels.time_kernels(BLOCK_TOKENS, 128, os.cpu_count() or 1)
    print(f"options: {options}; {os.cpu_count()} cores; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("scan kernels, ms per block: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    options.update(kernel=args.kernel, shards=args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        redis_url, redis_proc = procs.redis_or_embedded(os.environ.get("EMBEDQ_REDIS_URL"), Path(tmp) / "redis")
        server = None if args.uri else MilvusLiteServer(Path(tmp) / "milvus", procs.free_port()).start()
        try:
            client = redis.Redis.from_url(redis_url)
            header = None
            for n in args.pages:
                result = bench_search(args.uri or server.uri, client, n, server and server.proc.pid, **options)
                for run in result["runs"]:
                    row = {**{k: v for k, v in result.items() if k != "runs"}, **run}
                    if header is None:
                        header = list(row)
                        print(" | ".join(f"{key:>13}" for key in header))
                    print(" | ".join(f"{row[key]:>13}" for key in header), flush=True)
        finally:
            if server:
                server.stop()
            procs.stop([redis_proc] if redis_proc else [])


if __name__ == "__main__":
    main()
