"""Benchmark embedq in front of an OpenAI-compatible server against that server called directly, in
the same run: one Infinity (its own venv, scripts/infinity) serving MiniLM, and a `backend: openai`
worker and the API in front of it. Each cell (concurrency x texts per request) is driven closed-loop
by bench_text's asyncio client, direct and through embedq in turn, `--rounds` times, so that a noisy
moment falls on both; the table gives the medians and the ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch import procs  # noqa: E402
from scripts.bench_text import drive, stdlib_sentences  # noqa: E402
from tests import stack  # noqa: E402

MODEL = "minilm-upstream"


def start(logs: Path, threads: int, concurrency: int) -> tuple[list, object, int, int]:
    """Infinity, then Redis, a worker for MODEL in front of it, and the API: (children, server, its
    port, the API's port)."""
    infinity_port = procs.free_port()
    server = stack.infinity(infinity_port, logs / "infinity.log", threads=threads).start()
    server.wait_healthy(180)
    scratch = Path(tempfile.mkdtemp(prefix="embedq-bench-upstream-"))
    config = scratch / "models.yaml"
    config.write_text(
        f"models:\n  - name: {MODEL}\n    backend: openai\n    upstreams:\n"
        f"      - {{url: 'http://127.0.0.1:{infinity_port}/v1', model: minilm, concurrency: {concurrency}}}\n"
        "    max_input_tokens: 256\n    dim: 384\n    max_batch_size: 256\n    batch_token_budget: 65536\n"
    )
    redis_url, redis_proc = procs.redis_or_embedded(None, scratch / "redis")  # empty: no earlier run's queues
    env = stack.test_env(
        redis_url,
        config,
        EMBEDQ_WORKER_CONCURRENCY="128",
        EMBEDQ_TASK_EVENTS="false",
        EMBEDQ_VISIBILITY_TIMEOUT_S="30",
        EMBEDQ_REQUEST_TIMEOUT_S="60",
    )
    worker = stack.start_worker(env, MODEL, logs / "worker.log")
    api, base = stack.start_api(env, logs / "api.log")
    return [api, worker, *([redis_proc] if redis_proc else [])], server, infinity_port, int(base.rsplit(":", 1)[1])


def spread(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="Infinity's torch threads")
    parser.add_argument("--upstream-concurrency", type=int, default=8, help="the worker's requests in flight to it")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-upstream")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)

    texts = stdlib_sentences(args.texts)
    children, server, infinity_port, api_port = start(args.logs, args.threads, args.upstream_concurrency)
    print(f"# {len(texts)} stdlib docstring sentences, Infinity with {args.threads} thread(s), {os.cpu_count()} cores")
    print(
        "| concurrency | texts/request | Infinity texts/s | embedq texts/s | ratio | Infinity p50 ms | embedq p50 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for per_request in args.per_request:
            for concurrency in args.concurrency:
                rows: dict[str, list[dict]] = {"direct": [], "embedq": []}
                for _ in range(args.rounds):
                    for name, port, model in (("direct", infinity_port, "minilm"), ("embedq", api_port, MODEL)):
                        asyncio.run(drive(port, model, texts, concurrency, per_request, 1))  # warm-up
                        row = asyncio.run(drive(port, model, texts, concurrency, per_request, args.seconds))
                        assert row["errors"] == 0, row
                        rows[name].append(row)
                direct, embedq = ([r["texts_per_s"] for r in rows[n]] for n in ("direct", "embedq"))
                ratios = [e / d for e, d in zip(embedq, direct)]
                print(
                    f"| {concurrency} | {per_request} | {spread(direct)} | {spread(embedq)} | {spread(ratios, 2)} "
                    f"| {spread([r['p50_ms'] for r in rows['direct']], 1)} "
                    f"| {spread([r['p50_ms'] for r in rows['embedq']], 1)} |",
                    flush=True,
                )
    finally:
        procs.stop(children)
        server.stop()


if __name__ == "__main__":
    main()
