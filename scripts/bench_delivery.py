"""Benchmark delivery: is each uploaded page embedded once when the job outlasts the visibility timeout?

The probe of the "work done once" issue, as a new user would try it: the tiny ColQwen2 checkpoint
(built by `scripts/make_tiny_models.py`), real PDF manuals (by default the two Debian ships in
libtasn1-doc and shared-mime-info, 53 pages, when they are there; else generated pages; or
`--pdf FILE ...`), uploaded to a fresh stack (embedded Redis, Milvus Lite server, the API, one
ingestion worker, one model worker) once per visibility timeout asked for. Before embedq renewed
the leases of held messages, a 3 s timeout made the model embed 95 items for 53 pages and the
job end at 53 / 89.

For each run it prints the job's status and counts, the items the model embedded and the items
sent (`/metrics`: embedq_items_embedded_total, embedq_items_sent_total), the pages stored, and the
seconds from upload to the job's end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch import procs  # noqa: E402
from common.launch.milvus_lite import MilvusLiteServer  # noqa: E402
from scripts.bench_ingest import MODEL, make_pdf, models_file  # noqa: E402

MANUALS = [
    Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf"),
    Path("/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf"),
]


def documents(paths: list[Path]) -> list[tuple[str, bytes]]:
    if paths:
        return [(path.name, path.read_bytes()) for path in paths]
    if all(path.is_file() for path in MANUALS):
        return [(path.name, path.read_bytes()) for path in MANUALS]
    print("(the Debian manuals are not installed: using two generated PDFs of 36 and 17 pages)")
    return [("generated-36.pdf", make_pdf(36, seed=1)), ("generated-17.pdf", make_pdf(17, seed=2))]


def metric(text: str, name: str) -> int:
    """The page (image) count of counter `name` in a /metrics text."""
    found = re.findall(rf'^{name}\{{[^}}]*modality="image"[^}}]*\}} (\S+)$', text, re.M)
    return int(sum(float(value) for value in found))


def run(visibility_s: int, docs: list[tuple[str, bytes]], model_path: Path, threads: int) -> dict:
    import httpx

    from tests.stack import spawn, start_api, start_worker, test_env

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = models_file(tmp, model_path)
        redis_url, redis_proc = procs.redis_or_embedded(None, tmp / "redis")
        with MilvusLiteServer(tmp / "milvus", procs.free_port()) as milvus:
            env = test_env(
                redis_url,
                config,
                EMBEDQ_MILVUS_URI=milvus.uri,
                EMBEDQ_CPU_THREADS=str(threads),
                EMBEDQ_TASK_EVENTS="false",
                EMBEDQ_VISIBILITY_TIMEOUT_S=str(visibility_s),
                EMBEDQ_WORKER_HEARTBEAT_TTL_S="15",
                EMBEDQ_REQUEST_TIMEOUT_S="60",
            )
            children = [
                start_worker(env, MODEL, tmp / "worker.log"),
                spawn(["ingest-worker"], env, tmp / "ingest.log"),
            ]
            api, base = start_api(env, tmp / "api.log")
            children.append(api)
            try:
                httpx.post(
                    f"{base}/v1/collections", json={"name": "probe", "model": MODEL}, timeout=60
                ).raise_for_status()
                before = httpx.get(f"{base}/metrics").text
                started = time.monotonic()
                response = httpx.post(
                    f"{base}/v1/collections/probe/documents",
                    files=[("files", (name, data, "application/pdf")) for name, data in docs],
                    timeout=60,
                )
                response.raise_for_status()
                job_id = response.json()["id"]
                deadline = time.monotonic() + 900
                while (job := httpx.get(f"{base}/v1/jobs/{job_id}").json())["finished_at"] is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} did not end: {job}")
                    time.sleep(0.1)
                seconds = time.monotonic() - started
                time.sleep(2 * float(env["EMBEDQ_WORKER_HEARTBEAT_TTL_S"]) / 3)  # the counters' last beat
                after = httpx.get(f"{base}/metrics").text
                stored = httpx.get(f"{base}/v1/collections/probe").json()["count"]
            finally:
                procs.stop(children)
                if redis_proc:
                    procs.stop([redis_proc])
    embedded = metric(after, "embedq_items_embedded_total") - metric(before, "embedq_items_embedded_total")
    sent = metric(after, "embedq_items_sent_total") - metric(before, "embedq_items_sent_total")
    return {
        "visibility_s": visibility_s,
        "status": job["status"],
        "processed": job["processed"],
        "total": job["total"],
        "embedded": embedded,
        "sent": sent,
        "stored": stored,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--visibility", type=int, nargs="+", default=[30, 3], help="visibility timeouts (s), one run each"
    )
    parser.add_argument("--pdf", type=Path, nargs="*", default=[], help="PDFs to upload (default: the Debian manuals)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from tests.tiny_models import tiny_models_dir

    docs = documents(args.pdf)
    model_path = tiny_models_dir() / MODEL
    print(f"{len(docs)} PDFs ({', '.join(name for name, _ in docs)}), tiny {MODEL}, {args.threads} threads")
    print(
        "| visibility timeout | job status | processed / total | items embedded | items sent | pages stored | seconds |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for visibility_s in args.visibility:
        r = run(visibility_s, docs, model_path, args.threads)
        print(
            f"| {r['visibility_s']} s | {r['status']} | {r['processed']} / {r['total']} | {r['embedded']} "
            f"| {r['sent']} | {r['stored']} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
