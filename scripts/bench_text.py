"""Benchmark /v1/embeddings against the in-process ceiling, measured in the same run.

Texts: English sentences taken from Python's standard-library docstrings (text we did not write),
of mixed length. The ceiling is sentence-transformers' `encode` of the same model on the same
texts at its best batch size, in this process, before the service starts. The service is then
driven closed-loop over HTTP by a minimal asyncio client (so the load generator costs little of
the machine's CPU) at several concurrencies, with 1 and 32 texts per request. Each row also gives
the CPU time the API and the worker process spent per request (on a small machine every process
shares the cores the model needs).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch import procs  # noqa: E402

MODULES = [
    "json",
    "os",
    "collections",
    "asyncio",
    "pathlib",
    "argparse",
    "logging",
    "email",
    "http.client",
    "unittest",
    "subprocess",
    "threading",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "textwrap",
    "shutil",
    "tarfile",
    "zipfile",
    "csv",
    "sqlite3",
    "socket",
    "ssl",
    "urllib.request",
    "xml.dom.minidom",
]


def stdlib_sentences(count: int, seed: int = 0) -> list[str]:
    sentences: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc or "")):
                words = sentence.split()
                if 4 <= len(words) <= 60 and sentence[0].isupper() and sentence.endswith("."):
                    sentences.add(sentence)
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    return ordered[:count]


PAUSE_S = 0.01


def measure_ceiling(model_dir: str, texts: list[str], threads: int) -> dict:
    import torch

    from workers.backends.torch_compat import ensure_torchvision

    ensure_torchvision()
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64], batch_size=32)
    best = {}
    for batch_size in (8, 16, 32, 64, 128):
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            model.encode(texts, batch_size=batch_size)
            runs.append(len(texts) / (time.perf_counter() - started))
        best[batch_size] = statistics.median(runs)

    def single_ms(pause_s: float) -> float:
        times = []
        for text in texts[:200]:
            time.sleep(pause_s)
            started = time.perf_counter()
            model.encode([text], batch_size=1)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    batch_size = max(best, key=best.get)
    # Back to back, and after a pause like the gap between one client's requests: cores that
    # idled start the next forward slower.
    return {
        "texts_per_s": best[batch_size],
        "batch_size": batch_size,
        "by_batch_size": best,
        "single_forward_ms_p50": single_ms(0),
        "single_forward_after_pause_ms_p50": single_ms(PAUSE_S),
    }


class Connection:
    """One keep-alive HTTP/1.1 connection that posts pre-encoded JSON bodies."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)


async def drive(
    port: int, model: str, texts: list[str], concurrency: int, per_request: int, seconds: float, **options
) -> dict:
    """Closed-loop clients for `seconds`, each posting the next request of `per_request` texts (with
    the request `options`) as soon as it has the answer to its last."""
    bodies = [
        json.dumps(
            {"model": model, "input": texts[i : i + per_request], "encoding_format": "base64", **options}
        ).encode()
        for i in range(0, len(texts) - per_request + 1, per_request)
    ]
    latencies: list[float] = []
    done_texts = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int) -> None:
        nonlocal done_texts, errors
        conn = Connection("127.0.0.1", port)
        await conn.open()
        i = index
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += concurrency
            started = time.perf_counter()
            status, _ = await conn.post("/v1/embeddings", body)
            latencies.append((time.perf_counter() - started) * 1000)
            if status == 200:
                done_texts += per_request
            else:
                errors += 1
        conn.writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "per_request": per_request,
        "texts_per_s": done_texts / elapsed,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "requests": len(latencies),
        "errors": errors,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(model: str, threads: int, logs: Path, **overrides: str) -> tuple[list, int, str]:
    """A Redis (EMBEDQ_REDIS_URL, or an embedded one), a worker of `model` and the API, with the
    settings `overrides` on top: (the processes, the API's port, the Redis URL)."""
    from tests.stack import start_api, start_worker, test_env

    redis_url, redis_proc = procs.redis_or_embedded(os.environ.get("EMBEDQ_REDIS_URL"), logs / "redis")
    children = [redis_proc] if redis_proc else []
    env = test_env(
        redis_url,
        Path(os.environ.get("EMBEDQ_MODELS_FILE", ROOT / "models.yaml")),
        EMBEDQ_CPU_THREADS=str(threads),
        EMBEDQ_WORKER_CONCURRENCY="128",
        EMBEDQ_TASK_EVENTS="false",
        # production timeouts, not the tests' short ones
        EMBEDQ_VISIBILITY_TIMEOUT_S="30",
        EMBEDQ_REQUEST_TIMEOUT_S="60",
        **overrides,
    )
    children.append(start_worker(env, model, logs / "worker.log"))
    api, base = start_api(env, logs / "api.log")
    children.append(api)
    return children, int(base.rsplit(":", 1)[1]), redis_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)

    from common.registry import load_registry

    spec = load_registry(Path(os.environ.get("EMBEDQ_MODELS_FILE", ROOT / "models.yaml"))).get(args.model)
    texts = stdlib_sentences(args.texts)
    ceiling = measure_ceiling(spec.resolved_path(), texts, args.threads)
    print(f"# {len(texts)} stdlib docstring sentences, {args.threads} CPU threads, {os.cpu_count()} cores")
    print(
        f"ceiling (in-process encode, best batch size {ceiling['batch_size']}): {ceiling['texts_per_s']:.0f} texts/s; "
        f"one bare forward (1 text) p50 {ceiling['single_forward_ms_p50']:.2f} ms back to back, "
        f"{ceiling['single_forward_after_pause_ms_p50']:.2f} ms after a {PAUSE_S * 1000:.0f} ms pause"
    )
    children, port, _ = start_service(args.model, args.threads, args.logs)
    worker, api = children[-2:]
    try:
        print(
            "| concurrency | texts/request | texts/s | p50 ms | p99 ms | ratio to ceiling | errors "
            "| API CPU ms/request | worker CPU ms/request |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for per_request in args.per_request:
            for concurrency in args.concurrency:
                asyncio.run(drive(port, args.model, texts, concurrency, per_request, 2))  # warm-up
                before = cpu_seconds(api.pid), cpu_seconds(worker.pid)
                row = asyncio.run(drive(port, args.model, texts, concurrency, per_request, args.seconds))
                api_ms, worker_ms = (
                    1e3 * (cpu_seconds(p.pid) - b) / row["requests"] for p, b in zip((api, worker), before)
                )
                print(
                    f"| {concurrency} | {per_request} | {row['texts_per_s']:.0f} | {row['p50_ms']:.1f} | "
                    f"{row['p99_ms']:.1f} | {row['texts_per_s'] / ceiling['texts_per_s']:.2f} | {row['errors']} "
                    f"| {api_ms:.1f} | {worker_ms:.1f} |",
                    flush=True,
                )
    finally:
        procs.stop(children)


if __name__ == "__main__":
    main()
