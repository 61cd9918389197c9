"""Benchmark /v1/embeddings against the in-process ceiling and against Infinity, in the same run.

Texts: English sentences taken from Python's standard-library docstrings (text we did not write),
joined into inputs of about 16, 128 and 512 tokens (the token x batch matrix GPU embedding
platforms publish; a model with a shorter limit truncates). For each engine (`torch`, `onnx`):
- the ceiling: sentence-transformers' `encode` in this process, built by the worker's own loader
  (workers.backends.text), at its best batch size, and its CPU time per text;
- embedq (Redis, one worker, the API) driven closed-loop over HTTP by a minimal asyncio client (so
  the load generator costs little of the machine's CPU) at each concurrency, with 1 and 32 texts per
  request;
- Infinity 0.0.78 (its own venv, scripts/infinity) serving the same model with the same engine
  (`torch`, or `optimum` for ONNX), driven the same way.
Each row gives the service's CPU time per request outside the forward pass: the CPU its processes
spent (API, worker and Redis; Infinity's one process) less the ceiling's CPU for those texts.
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
import tempfile
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


def inputs_of_length(tokenizer, sentences: list[str], tokens: int, count: int) -> list[str]:
    """`count` inputs of about `tokens` tokens each: sentences joined until they reach it."""
    inputs, pending, length = [], [], 0
    for sentence in sentences * (1 + tokens * count // 8):
        pending.append(sentence)
        length += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if length >= tokens * 0.8:
            if length <= tokens * 1.25:
                inputs.append(" ".join(pending))
                if len(inputs) == count:
                    return inputs
            pending, length = [], 0
    raise SystemExit(f"not enough sentences for {count} inputs of about {tokens} tokens")


class WorkerBackend:
    """The worker's own text backend (workers.backends.text) in this process, with an `encode` like
    sentence-transformers': the in-process ceiling of an engine sentence-transformers cannot run here."""

    def __init__(self, spec, threads: int):
        from common.settings import Settings
        from workers.backends import text
        from workers.backends.base import EmbedInput, finalize

        self._input, self._finalize = EmbedInput, finalize
        self.backend = text.create(spec, "cpu", Settings(cpu_threads=threads))
        self.backend.load()
        self.backend.warmup()

    def encode(self, texts: list[str], batch_size: int) -> list:
        vectors = []
        for start in range(0, len(texts), batch_size):
            prepared = [self.backend.prepare(self._input("text", text=t)) for t in texts[start : start + batch_size]]
            raw = self.backend.embed(prepared)
            vectors += [self._finalize(a, pooled=True, normalize=True, dimensions=None) for a in raw]
        return vectors


def load_reference(spec, engine: str, threads: int):
    """What the in-process ceiling runs: sentence-transformers for torch; for onnx, which
    sentence-transformers' ONNX backend cannot load here (its optimum-onnx pins an older
    transformers), the worker's own backend with `engine: onnx`."""
    import torch

    from workers.backends.torch_compat import ensure_torchvision

    ensure_torchvision()
    torch.set_num_threads(threads)
    if engine == "onnx":
        return WorkerBackend(spec.model_copy(update={"engine": "onnx"}), threads)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(spec.resolved_path(), device="cpu")


def infinity_onnx_dir(model_dir: str, logs: Path) -> Path:
    """The model with an ONNX export by Infinity's own optimum (`optimum-cli export onnx`), which its
    `optimum` engine needs in the model's directory; made once."""
    import subprocess

    folder = logs / "infinity-onnx"
    if not (folder / "model.onnx").exists():
        infinity = Path(
            subprocess.run(
                [str(ROOT / "scripts" / "infinity")], check=True, capture_output=True, text=True
            ).stdout.strip()
        )
        cli = infinity.parent / "optimum-cli"
        subprocess.run(
            [
                str(cli),
                "export",
                "onnx",
                "--model",
                model_dir,
                "--task",
                "feature-extraction",
                "--library-name",
                "transformers",
                str(folder),
            ],
            check=True,
        )
    return folder


PAUSE_S = 0.01


def measure_ceiling(model, texts: list[str], budget_s: float = 3.0) -> dict:
    """The model's best throughput over batch sizes, its CPU time per text, and one text's forward
    back to back and after a pause like the gap between one client's requests (cores that idled
    start the next forward slower)."""
    model.encode(texts[:32], batch_size=32)
    best: dict[int, tuple[float, float]] = {}  # batch size -> (texts/s, CPU ms per text)
    for batch_size in (8, 16, 32, 64):
        runs = []
        for _ in range(3):
            n, cpu, started = 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - started < budget_s / 3:
                model.encode(texts[n % len(texts) : n % len(texts) + batch_size * 2], batch_size=batch_size)
                n += batch_size * 2
            elapsed = time.perf_counter() - started
            runs.append((n / elapsed, 1e3 * (time.process_time() - cpu) / n))
        best[batch_size] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))

    def single_ms(pause_s: float) -> float:
        times = []
        for text in texts[:60]:
            time.sleep(pause_s)
            started = time.perf_counter()
            model.encode([text], batch_size=1)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    batch_size = max(best, key=lambda b: best[b][0])
    return {
        "texts_per_s": best[batch_size][0],
        "cpu_ms_per_text": best[batch_size][1],
        "batch_size": batch_size,
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
    port: int,
    model: str,
    texts: list[str],
    concurrency: int,
    per_request: int,
    seconds: float,
    path: str = "/v1/embeddings",
    **options,
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
            status, _ = await conn.post(path, body)
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
    settings = {
        "EMBEDQ_CPU_THREADS": str(threads),
        "EMBEDQ_WORKER_CONCURRENCY": "128",
        "EMBEDQ_TASK_EVENTS": "false",
        # production timeouts, not the tests' short ones; 64 clients of 32 long inputs wait longer
        "EMBEDQ_VISIBILITY_TIMEOUT_S": "30",
        "EMBEDQ_REQUEST_TIMEOUT_S": "300",
        **overrides,
    }
    env = test_env(redis_url, Path(os.environ.get("EMBEDQ_MODELS_FILE", ROOT / "models.yaml")), **settings)
    children.append(start_worker(env, model, logs / "worker.log"))
    api, base = start_api(env, logs / "api.log")
    children.append(api)
    return children, int(base.rsplit(":", 1)[1]), redis_url


def models_file(spec, engine: str, directory: Path) -> Path:
    """A models file serving `spec` alone, with `engine`."""
    import yaml

    path = directory / f"models-{engine}.yaml"
    entry = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    entry.update(
        name=spec.name, backend=spec.backend, path=spec.path, **({"engine": engine} if engine != "torch" else {})
    )
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


def run_rows(port: int, path: str, model: str, pids: list[int], cases: list[tuple], seconds: float) -> dict:
    """Each (length, texts/request, concurrency) case driven for `seconds` after a warm-up: its
    figures and the CPU its `pids` spent per request."""
    rows = {}
    for length, texts, per_request, concurrency in cases:
        asyncio.run(drive(port, model, texts, concurrency, per_request, 1, path))  # warm-up
        before = [cpu_seconds(pid) for pid in pids]
        row = asyncio.run(drive(port, model, texts, concurrency, per_request, seconds, path))
        row["cpu_ms"] = 1e3 * sum(cpu_seconds(pid) - b for pid, b in zip(pids, before)) / max(row["requests"], 1)
        rows[(length, per_request, concurrency)] = row
        print(f"  {model} {length} tokens x{per_request} c{concurrency}: {row['texts_per_s']:.0f} texts/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512], help="tokens per input")
    parser.add_argument("--texts", type=int, default=400, help="distinct inputs per length")
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-infinity", action="store_true", help="leave Infinity out")
    parser.add_argument("--set", nargs="*", default=[], metavar="EMBEDQ_X=V", help="settings for embedq's processes")
    parser.add_argument("--logs", type=Path, default=ROOT / "var" / "bench")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    overrides = dict(item.split("=", 1) for item in args.set)

    from transformers import AutoTokenizer

    from common.registry import load_registry
    from tests import stack

    spec = load_registry(Path(os.environ.get("EMBEDQ_MODELS_FILE", ROOT / "models.yaml"))).get(args.model)
    tokenizer = AutoTokenizer.from_pretrained(spec.resolved_path())
    sentences = stdlib_sentences(5000)
    inputs = {length: inputs_of_length(tokenizer, sentences, length, args.texts) for length in args.lengths}
    cases = [
        (length, inputs[length], per_request, concurrency)
        for length in args.lengths
        for per_request in args.per_request
        for concurrency in args.concurrency
    ]
    print(
        f"# {args.model} (at most {spec.max_input_tokens} tokens), {args.threads} CPU threads, {os.cpu_count()} cores; "
        f"settings {overrides or 'default'}"
    )
    results = {}
    for engine in args.engines:
        reference = load_reference(spec, engine, args.threads)
        ceilings = {length: measure_ceiling(reference, inputs[length]) for length in args.lengths}
        del reference
        for length, ceiling in ceilings.items():
            print(
                f"ceiling {engine} {length} tokens: {ceiling['texts_per_s']:.0f} texts/s at batch "
                f"{ceiling['batch_size']}, {ceiling['cpu_ms_per_text']:.1f} CPU ms/text; one forward p50 "
                f"{ceiling['single_forward_ms_p50']:.1f} ms, {ceiling['single_forward_after_pause_ms_p50']:.1f} ms "
                f"after a {PAUSE_S * 1000:.0f} ms pause",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as directory:
            file = models_file(spec, engine, Path(directory))
            children, port, _ = start_service(
                args.model, args.threads, args.logs, EMBEDQ_MODELS_FILE=str(file), **overrides
            )
            try:
                embedq = run_rows(port, "/v1/embeddings", args.model, [c.pid for c in children], cases, args.seconds)
            finally:
                procs.stop(children)
        peer = {}
        if not args.no_infinity:
            infinity_port = procs.free_port()
            server = stack.infinity(
                infinity_port,
                args.logs / f"infinity-{engine}.log",
                threads=args.threads,
                engine="optimum" if engine == "onnx" else "torch",
                model_dir=infinity_onnx_dir(spec.resolved_path(), args.logs) if engine == "onnx" else None,
            ).start()
            try:
                server.wait_healthy(300)
                peer = run_rows(infinity_port, "/v1/embeddings", "minilm", [server.proc.pid], cases, args.seconds)
            finally:
                server.stop()
        results[engine] = (ceilings, embedq, peer)
    print_table(results)


def print_table(results: dict) -> None:
    print(
        "\n| engine | tokens | texts/req | conc | embedq texts/s | x ceiling | x Infinity | p50 ms | Infinity p50 ms "
        "| p99 ms | CPU ms/req outside forward | Infinity's | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for engine, (ceilings, embedq, peer) in results.items():
        for (length, per_request, concurrency), row in embedq.items():
            ceiling = ceilings[length]
            forward_ms = ceiling["cpu_ms_per_text"] * per_request
            other = peer.get((length, per_request, concurrency))
            versus = f"{row['texts_per_s'] / other['texts_per_s']:.2f}" if other else "-"
            print(
                f"| {engine} | {length} | {per_request} | {concurrency} | {row['texts_per_s']:.0f} | "
                f"{row['texts_per_s'] / ceiling['texts_per_s']:.2f} | {versus} | {row['p50_ms']:.1f} | "
                f"{other['p50_ms'] if other else float('nan'):.1f} | {row['p99_ms']:.1f} | "
                f"{row['cpu_ms'] - forward_ms:.1f} | {other['cpu_ms'] - forward_ms if other else float('nan'):.1f} | "
                f"{row['errors']}{'/' + str(other['errors']) if other else ''} |"
            )


if __name__ == "__main__":
    main()
