"""Benchmark requests the embedding cache answers whole, against the same requests computed.

The service runs as `embedq up` runs it: a Redis, the cache's own bounded Redis, a MiniLM worker
and the API. Texts are stdlib docstring sentences (scripts/bench_text). Each round sends every text
once to fill the cache, then drives closed-loop clients over HTTP for `--seconds` twice: once over
those texts (every input a hit: no worker is needed), and once over the same texts with
`cache: false` (a forward pass each). It checks that the cached runs cost no forward pass (the
worker's count of inputs embedded, keys.ITEMS). The machine is noisy: each figure is the median of
`--rounds` rounds, with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_text import drive, start_service, stdlib_sentences  # noqa: E402

from common import keys  # noqa: E402
from common.launch import procs  # noqa: E402


def embedded(client: redis.Redis, model: str) -> int:
    return int(client.hget(keys.ITEMS, f"embedded:{model}:text") or 0)


def fill(port: int, model: str, texts: list[str]) -> None:
    """Every text embedded once, so that the cache holds them all (it is kept per input)."""
    for i in range(0, len(texts), 32):
        body = {"model": model, "input": texts[i : i + 32]}
        httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60).raise_for_status()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-cache")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)

    texts = stdlib_sentences(args.texts)
    cache_port = procs.free_port()
    cache = procs.start_cache_redis(args.logs / "cache", cache_port, 256)
    children, port, redis_url = start_service(
        args.model, args.threads, args.logs, EMBEDQ_CACHE_URL=f"redis://127.0.0.1:{cache_port}/0"
    )
    client = redis.Redis.from_url(redis_url)
    rows: dict[tuple[int, int, bool], list[dict]] = {}
    try:
        print(f"# {len(texts)} stdlib docstring sentences, {args.threads} CPU threads, {os.cpu_count()} cores")
        for _ in range(args.rounds):
            fill(port, args.model, texts)
            for per_request in args.per_request:
                for concurrency in args.concurrency:
                    before = embedded(client, args.model)
                    row = asyncio.run(drive(port, args.model, texts, concurrency, per_request, args.seconds))
                    assert embedded(client, args.model) == before, "a cached run computed inputs"
                    rows.setdefault((per_request, concurrency, True), []).append(row)
                    row = asyncio.run(
                        drive(port, args.model, texts, concurrency, per_request, args.seconds, cache=False)
                    )
                    rows.setdefault((per_request, concurrency, False), []).append(row)
        print(
            f"| texts/request | concurrency | cache | p50 ms | p99 ms | texts/s | errors |  "
            f"(median of {args.rounds} rounds of {args.seconds:g} s, range)"
        )
        print("|---:|---:|---|---:|---:|---:|---:|")
        for (per_request, concurrency, cached), runs in rows.items():
            print(
                f"| {per_request} | {concurrency} | {'all hits' if cached else 'cache: false'} "
                f"| {spread([r['p50_ms'] for r in runs])} | {spread([r['p99_ms'] for r in runs])} "
                f"| {statistics.median(r['texts_per_s'] for r in runs):.0f} | {sum(r['errors'] for r in runs)} |",
                flush=True,
            )
    finally:
        procs.stop([*children, cache])


if __name__ == "__main__":
    main()
