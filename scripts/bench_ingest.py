"""Benchmark ingestion: pages/s of upload → job completed, against the in-process ceiling.

The model is the tiny ColQwen2 checkpoint that `scripts/make_tiny_models.py` builds (the only
late-interaction model that runs offline on a CPU); the document is a generated PDF of text-like
pages. The in-process ceiling is the same backend called directly in this process at its best
batch size on the pages already rendered at the service's DPI (PNG in, as the worker gets them).
The service has more to do: render the PDF, move PNG pages through Redis, keep each page as a
JPEG and a thumbnail in the blob store (timed here apart, in-process), write Milvus, count
progress; it overlaps that work with the forward passes (rendering in the ingestion worker,
decoding and preprocessing in the model worker's task threads while the device runs a batch).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.launch import procs  # noqa: E402
from common.launch.milvus_lite import MilvusLiteServer  # noqa: E402

MODEL = "colqwen2"


def make_pdf(pages: int, seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    images = []
    for number in range(pages):
        image = Image.new("RGB", (595, 842), "white")  # A4 in points
        draw = ImageDraw.Draw(image)
        for line in range(40):
            width = int(rng.randint(200, 520))
            draw.rectangle([40, 40 + line * 19, 40 + width, 50 + line * 19], fill=(30, 30, 30))
        draw.text((40, 10), f"document {seed} page {number + 1}", fill="black")
        images.append(image)
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return out.getvalue()


def models_file(folder: Path, checkpoint: Path) -> Path:
    """A models.yaml in `folder` serving the tiny ColQwen2 at `checkpoint` on the CPU."""
    config = folder / "models.yaml"
    config.write_text(
        f"models:\n  - name: {MODEL}\n    backend: colpali\n    model_class: ColQwen2\n"
        f"    path: {checkpoint}\n    device: cpu\n    modalities: [text, image]\n"
    )
    return config


def measure_ceiling(spec, pdf: bytes, threads: int) -> dict:
    import torch

    from common.inputs.documents import count_pdf_pages, render_pdf_pages
    from common.inputs.images import encode_png, page_views
    from common.settings import Settings
    from workers.backends import create_backend
    from workers.backends.base import EmbedInput

    torch.set_num_threads(threads)
    started = time.perf_counter()
    settings = Settings()
    images = [
        image for _, image in render_pdf_pages(pdf, settings.pdf_dpi(count_pdf_pages(pdf)), settings.max_image_pixels)
    ]
    render_s = time.perf_counter() - started
    started = time.perf_counter()
    kept = [page_views(image, settings.page_image_quality, settings.thumb_width) for image in images]
    keep_s = time.perf_counter() - started
    pages = [encode_png(image) for image in images]
    backend = create_backend(spec, "cpu", settings)
    backend.load()
    backend.warmup()
    rates = {}
    for batch_size in (1, 4, 8, 16):
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for start in range(0, len(pages), batch_size):
                # The image given to `prepare` is decoded from PNG, as in the service: that decode
                # is the model's input path, so it belongs to the ceiling.
                batch = [backend.prepare(EmbedInput("image", image=p)) for p in pages[start : start + batch_size]]
                backend.embed(batch)
            runs.append(time.perf_counter() - started)
        rates[batch_size] = len(pages) / statistics.median(runs)
    best = max(rates, key=rates.get)
    return {
        "render_pages_per_s": len(pages) / render_s,
        "keep_ms_per_page": 1000 * keep_s / len(pages),
        "kept_kb_per_page": sum(len(v) for views in kept for v in views.values()) / len(pages) / 1024,
        "ceiling_pages_per_s": rates[best],
        "batch_size": best,
    }


def run_service_jobs(env: dict, logs: Path, pages: int, runs: int) -> list[float]:
    import httpx

    from tests.stack import spawn, start_api, start_worker

    children = [start_worker(env, MODEL, logs / "worker.log"), spawn(["ingest-worker"], env, logs / "ingest.log")]
    api, base = start_api(env, logs / "api.log")
    children.append(api)
    try:
        httpx.post(
            f"{base}/v1/collections", json={"name": "bench_ingest", "model": MODEL}, timeout=60
        ).raise_for_status()
        rates = []
        for run in range(runs):
            pdf = make_pdf(pages, seed=100 + run)
            response = httpx.post(
                f"{base}/v1/collections/bench_ingest/documents",
                files=[("files", (f"doc{run}.pdf", pdf, "application/pdf"))],
                timeout=60,
            )
            response.raise_for_status()
            job_id = response.json()["id"]
            deadline = time.monotonic() + 600
            while (job := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] not in ("completed", "failed"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish: {job}")
                time.sleep(0.05)
            if job["status"] != "completed" or job["processed"] != pages:
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job}")
            rates.append(pages / (job["finished_at"] - job["created_at"]))
        return rates
    finally:
        procs.stop(children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from common.registry import ModelSpec
    from tests.stack import test_env
    from tests.tiny_models import tiny_models_dir

    path = tiny_models_dir() / MODEL
    spec = ModelSpec(
        name=MODEL,
        backend="colpali",
        model_class="ColQwen2",
        path=str(path),
        device="cpu",
        modalities=["text", "image"],
    )
    ceiling = measure_ceiling(spec, make_pdf(args.pages, seed=1), args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = models_file(tmp, path)
        redis_url, redis_proc = procs.redis_or_embedded(os.environ.get("EMBEDQ_REDIS_URL"), tmp / "redis")
        with MilvusLiteServer(tmp / "milvus", procs.free_port()) as milvus:
            env = test_env(
                redis_url,
                config,
                EMBEDQ_MILVUS_URI=milvus.uri,
                EMBEDQ_CPU_THREADS=str(args.threads),
                EMBEDQ_TASK_EVENTS="false",
                EMBEDQ_VISIBILITY_TIMEOUT_S="30",
                EMBEDQ_REQUEST_TIMEOUT_S="60",
                EMBEDQ_BLOB_URI=str(tmp / "blobs"),
            )
            try:
                rates = run_service_jobs(env, tmp, args.pages, args.runs)
            finally:
                procs.stop([redis_proc] if redis_proc else [])
    service = statistics.median(rates)
    print(
        f"# ingestion of a {args.pages}-page PDF (tiny ColQwen2, CPU, {args.threads} threads, {os.cpu_count()} cores)"
    )
    print("| measure | pages/s |\n|---|---:|")
    print(f"| rendering alone (pypdfium2, policy DPI), in-process | {ceiling['render_pages_per_s']:.1f} |")
    print(
        f"| in-process ceiling: the backend at its best batch size ({ceiling['batch_size']}) | {ceiling['ceiling_pages_per_s']:.1f} |"
    )
    print(
        f"| keeping each page to be seen (full JPEG + thumbnail), in-process | {ceiling['keep_ms_per_page']:.1f} ms a page, {ceiling['kept_kb_per_page']:.0f} KB |"
    )
    print(f"| service, upload → job completed (median of {args.runs}) | {service:.1f} |")
    print(f"| ratio | {service / ceiling['ceiling_pages_per_s']:.2f} |")


if __name__ == "__main__":
    main()
