"""/v1/embeddings and /v1/models through the official openai client, against a real worker."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from .conftest import MINILM

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "Redis queues feed greedy-batching workers that keep the device busy with whatever is pending.",
    "x",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_equal_sentence_transformers(openai_client, reference_minilm):
    response = openai_client.embeddings.create(model=MINILM, input=TEXTS)
    ours = np.array([item.embedding for item in response.data])
    reference = reference_minilm.encode(TEXTS)
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    assert cosine_rows(ours, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_single_string_and_long_input_truncated(openai_client, reference_minilm):
    long_text = "retrieval augmented generation " * 200  # well over 256 tokens
    response = openai_client.embeddings.create(model=MINILM, input=long_text)
    reference = reference_minilm.encode([long_text])
    assert len(response.data) == 1
    assert cosine_rows(np.array([response.data[0].embedding]), reference)[0] >= 0.9999
    assert response.usage.prompt_tokens == 256


def test_base64_decodes_to_the_same_floats(openai_client):
    as_float = openai_client.embeddings.create(model=MINILM, input=TEXTS[:2], encoding_format="float")
    raw = httpx.post(
        f"{openai_client.base_url}embeddings", json={"model": MINILM, "input": TEXTS[:2], "encoding_format": "base64"}
    ).json()
    for item, expected in zip(raw["data"], as_float.data):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(expected.embedding, dtype=np.float32))


def test_openai_client_default_base64_path(openai_client):
    # Without encoding_format the openai client asks for base64 and decodes it itself.
    response = openai_client.embeddings.create(model=MINILM, input="hello")
    assert len(response.data[0].embedding) == 384


def test_dimensions_truncate_then_renormalize(openai_client, reference_minilm):
    response = openai_client.embeddings.create(model=MINILM, input=TEXTS, dimensions=128)
    ours = np.array([item.embedding for item in response.data])
    full = reference_minilm.encode(TEXTS, normalize_embeddings=False)[:, :128]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert ours.shape == (len(TEXTS), 128)
    assert cosine_rows(ours, expected).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_token_id_inputs(openai_client, reference_minilm):
    tokenizer = reference_minilm.tokenizer
    ids = [tokenizer(text)["input_ids"] for text in TEXTS[:2]]
    by_ids = openai_client.embeddings.create(model=MINILM, input=ids)
    by_text = openai_client.embeddings.create(model=MINILM, input=TEXTS[:2])
    ours = np.array([item.embedding for item in by_ids.data])
    assert cosine_rows(ours, np.array([item.embedding for item in by_text.data])).min() >= 0.9999
    one = openai_client.embeddings.create(model=MINILM, input=ids[0])
    assert len(one.data) == 1
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)


def test_usage_counts_real_tokens(openai_client, reference_minilm):
    response = openai_client.embeddings.create(model=MINILM, input=TEXTS)
    expected = sum(len(reference_minilm.tokenizer(text)["input_ids"]) for text in TEXTS)
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected
    assert response.model == MINILM


def test_normalize_false_gives_raw_mean_pooling(api_url, reference_minilm):
    body = httpx.post(f"{api_url}/v1/embeddings", json={"model": MINILM, "input": TEXTS[:2], "normalize": False}).json()
    ours = np.array([item["embedding"] for item in body["data"]])
    # The reference pipeline ends in a Normalize module; mean its token embeddings instead.
    tokens = reference_minilm.encode(TEXTS[:2], output_value="token_embeddings")
    pooled = np.stack([t.numpy().mean(0) for t in tokens])
    assert np.linalg.norm(ours, axis=1).max() > 1.5
    np.testing.assert_allclose(ours, pooled, rtol=1e-4, atol=1e-5)


def test_models_endpoints(openai_client):
    listed = openai_client.models.list()
    assert [m.id for m in listed.data] == [MINILM]
    assert openai_client.models.retrieve(MINILM).id == MINILM
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_health(api_url):
    assert httpx.get(f"{api_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api_url}/health/live").status_code == 200
    ready = httpx.get(f"{api_url}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["workers"] == {f"{MINILM}/text": 1}


def test_docs_have_syntax_highlighting_off(api_url):
    page = httpx.get(f"{api_url}/docs").text
    assert '"syntaxHighlight": false' in page
