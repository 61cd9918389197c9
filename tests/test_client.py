"""Direct Celery submission without the API: our `EmbedqClient`, and plain Celery as the README shows it."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
import redis
from celery import Celery
from PIL import Image

from common.client import EmbedqClient
from common.contract import embed_queue
from common.errors import InputTooLong, ServiceUnavailable
from common.launch import procs

from .conftest import MINILM
from .stack import start_worker
from .tiny_models import tiny_models_dir

TINY = "client-colmodernvbert"
TEXTS = ["Queues feed workers.", "Late interaction keeps one vector per token.", "x"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def colmodernvbert(stack_env, logs, tmp_path_factory):
    """A worker for a tiny ColModernVBert checkpoint on its image queue."""
    config = tmp_path_factory.mktemp("client") / "models.yaml"
    config.write_text(f"""models:
  - name: {TINY}
    backend: colpali
    model_class: ColModernVBert
    path: {tiny_models_dir() / "colmodernvbert"}
    device: cpu
    modalities: [text, image]
""")
    proc = start_worker({**stack_env, "EMBEDQ_MODELS_FILE": str(config)}, TINY, logs / "worker-client-tiny.log")
    yield
    procs.stop([proc])


def png(seed: int, width: int, height: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def client(stack_env, minilm_worker):
    client = EmbedqClient(stack_env["EMBEDQ_REDIS_URL"])
    yield client
    client.close()


def test_embed_texts_equals_sentence_transformers(client, reference_minilm):
    vectors = client.embed_texts(MINILM, TEXTS, timeout=30)
    assert [v.shape for v in vectors] == [(384,)] * len(TEXTS)
    assert cosine_rows(np.stack(vectors), reference_minilm.encode(TEXTS)).min() >= 0.9999


def test_several_results_in_flight(client, reference_minilm):
    batches = [[f"request {r} sentence {i}" for i in range(r + 1)] for r in range(6)]
    results = [client.submit_texts(MINILM, texts, dimensions=128, dtype="float16") for texts in batches]
    assert all(result.id for result in results)
    for texts, result in zip(batches, results):
        answer = result.get(timeout=30)
        assert answer["dtype"] == "float16" and len(answer["tokens"]) == len(texts)
        ours = np.stack(client.wait(result, timeout=30)).astype(np.float32)
        assert ours.shape == (len(texts), 128)
        reference = reference_minilm.encode(texts)[:, :128]
        assert cosine_rows(ours, reference).min() >= 0.999  # float16 on the wire


def test_embed_images_multivector(client, colmodernvbert):
    pages = client.embed_images(TINY, [png(1, 96, 128), png(2, 64, 64)], timeout=60)
    queries = client.embed_texts(TINY, ["revenue in 2023"], output="multivector", input_type="query", timeout=60)
    assert len(pages) == 2 and len(queries) == 1
    for matrix in pages + queries:
        assert matrix.ndim == 2 and matrix.shape[1] == pages[0].shape[1]
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


def test_worker_error_comes_back_as_our_class(client):
    result = client.submit_texts(MINILM, ["retrieval " * 400], truncate=False)
    with pytest.raises(InputTooLong) as raised:
        result.get(timeout=30)
    assert raised.value.param == "input" and "over this model's limit" in raised.value.message


def test_no_worker_times_out_clearly(client, stack_env):
    model = "model-without-worker"
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailable, match=r"within 1\.5s"):
            client.embed_texts(model, ["hello"], timeout=1.5)
        assert 1.5 <= time.monotonic() - started < 5
    finally:
        redis.Redis.from_url(stack_env["EMBEDQ_REDIS_URL"]).delete(embed_queue(model, "text"))


def test_plain_celery_send_task(stack_env, minilm_worker, reference_minilm):
    url = stack_env["EMBEDQ_REDIS_URL"]
    app = Celery(broker=url, backend=url)
    # The worker answers in msgpack (vectors as bytes); Celery accepts only JSON unless told.
    app.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack"])
    try:
        result = app.send_task(
            "embedq.embed",
            kwargs={"model": MINILM, "modality": "text", "inputs": [{"text": t} for t in TEXTS]},
            queue=f"embed.{MINILM}.text",
        )
        answer = result.get(timeout=30)
    finally:
        app.close()
    dtype = np.dtype(answer["dtype"]).newbyteorder("<")
    vectors = np.stack(
        [np.frombuffer(raw, dtype).reshape(shape) for raw, shape in zip(answer["data"], answer["shapes"])]
    )
    assert cosine_rows(vectors, reference_minilm.encode(TEXTS)).min() >= 0.9999


def test_client_imports_no_model_code():
    code = "import sys, common.client; print([m for m in ('torch', 'transformers', 'workers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
